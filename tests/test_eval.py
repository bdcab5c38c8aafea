"""`slimvlm eval`: the lmms-eval backend on the bundled shapes task, end to end, offline.

The accuracy of every method through lmms-eval equals what benchmarks/bench_retention.py's own evaluation
gets on the same questions (`shapes.evaluate` after `set_compression`; VoCo: `evaluate_voco`, as
train_voco_demo.py reports it), answer for answer, and a batch-size-1 run answers like a batched one.
"""

import json
import os
import shutil

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the [eval] extra plus "
                    "`pip install --no-deps lmms-eval==0.7.3`; `make test` installs both)")

from slimvlm.cli import load, main  # noqa: E402
from slimvlm.configuration_slimvlm import sparsevlm_setting  # noqa: E402
from slimvlm.demo import shapes  # noqa: E402
from slimvlm.demo.run import BUNDLED_MODEL, BUNDLED_VOCO_MODEL  # noqa: E402
from slimvlm.demo.voco_shapes import evaluate_voco  # noqa: E402
from slimvlm.eval.run import compare_settings, join_model_args, split_model_args, with_option  # noqa: E402
from slimvlm.eval.shapes_data import TASK_DIR, heldout_samples, write_shapes_dataset  # noqa: E402

QUESTIONS = 40  # scored against the reference
BATCH_CHECK = 8  # answered again at batch size 1
SETTINGS = {
    "none": {"method": "none"},
    "visionzip 64": {"method": "visionzip", "tokens": 64},
    "sparsevlm 64": sparsevlm_setting(4, 64),  # the bundled LM has 4 layers: the preset's scaled layers
    # the VoCo companion answers from its 2 cached tokens; the demo vocabulary has no system prompt
    "voco": {"pretrained": str(BUNDLED_VOCO_MODEL), "system_prompt": ""},
}


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    saved = dict(os.environ)
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "LMMS_EVAL_DATASETS_CACHE": str(tmp_path_factory.mktemp("datasets-cache"))})
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, offline):
    """The repository's shapes_vqa task folder with its data written next to the YAML."""
    root = tmp_path_factory.mktemp("tasks")
    shutil.copytree(TASK_DIR, root / "shapes_vqa", ignore=shutil.ignore_patterns("data", "__pycache__"))
    write_shapes_dataset(root / "shapes_vqa" / "data", questions=QUESTIONS)
    return root


@pytest.fixture(scope="module")
def reference():
    """label -> (accuracy, predictions) from the benchmark's own evaluation code."""
    samples = heldout_samples(QUESTIONS)
    model, processor = load(BUNDLED_MODEL)
    out = {}
    for label, compression in SETTINGS.items():
        if "method" in compression:
            model.set_compression(compression)
            processor.set_compression(model.config.compression)
            out[label] = shapes.evaluate(model, processor, samples, batch_size=25, return_predictions=True)
    voco_model, voco_processor = load(BUNDLED_VOCO_MODEL)
    out["voco"] = evaluate_voco(voco_model, voco_processor, samples, batch_size=25)
    return out


def run(tasks, out, batch_size: int, limit: int, model_args: str, *extra: str) -> None:
    code = main(["eval", *extra, "--tasks", "shapes_vqa", "--include_path", str(tasks), "--limit", str(limit),
                 "--batch_size", str(batch_size), "--output_path", str(out), "--log_samples", "--verbosity", "WARNING",
                 "--model_args", model_args])
    assert code == 0


def answers(results_file: str) -> dict[int, str]:
    """doc_id -> the normalised answer lmms-eval logged next to a results file."""
    results = os.path.dirname(results_file)
    [log] = [f for f in os.listdir(results) if f.endswith("_samples_shapes_vqa.jsonl")]
    with open(os.path.join(results, log)) as lines:
        logged = [json.loads(line) for line in lines]
    return {s["doc_id"]: shapes.normalize_answer("".join(s["filtered_resps"])) for s in logged}


@pytest.fixture(scope="module")
def batched(tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("batched")
    run(tasks, out, 8, QUESTIONS, f"pretrained={BUNDLED_MODEL}", "--compare", json.dumps(SETTINGS))
    return json.loads((out / "compare.json").read_text())


def test_each_method_scores_what_the_benchmark_gets_answer_for_answer(batched, reference):
    rows = {row["label"]: row for row in batched["rows"]}
    assert list(rows) == list(SETTINGS)
    for label, (accuracy, predictions) in reference.items():
        assert rows[label]["scores"]["shapes_vqa"] == pytest.approx(accuracy), label
        logged = answers(rows[label]["results"])
        assert [logged[i] for i in range(QUESTIONS)] == predictions, label
    # the methods differ on these questions, so equal scores are not a coincidence of one answer pattern
    assert len({rows[label]["scores"]["shapes_vqa"] for label in rows}) > 2


def test_batch_size_one_answers_like_a_batch(batched, tasks, tmp_path):
    """SparseVLM (ragged pruning) and VoCo (two-stage cache) cover both generation paths of the backend; none and
    VisionZip take SparseVLM's path with the stock sequence."""
    rows = {row["label"]: row for row in batched["rows"]}
    for label in ("sparsevlm 64", "voco"):
        setting = SETTINGS[label]
        overrides = {"compression": setting} if "method" in setting else setting
        model_args = join_model_args({"pretrained": str(BUNDLED_MODEL), **overrides})
        run(tasks, tmp_path / label, 1, BATCH_CHECK, model_args)
        [results] = (tmp_path / label).rglob("*_results.json")
        many = answers(rows[label]["results"])
        assert answers(str(results)) == {i: many[i] for i in range(BATCH_CHECK)}, label


def test_compare_table_and_efficiency_logs(batched):
    rows = {row["label"]: row for row in batched["rows"]}
    assert rows["none"]["retention"]["shapes_vqa"] == 1.0
    assert rows["visionzip 64"]["retention"]["shapes_vqa"] == pytest.approx(
        rows["visionzip 64"]["scores"]["shapes_vqa"] / rows["none"]["scores"]["shapes_vqa"])
    assert (rows["none"]["visual_tokens"], rows["visionzip 64"]["visual_tokens"], rows["voco"]["visual_tokens"]) == (576, 64, 2)
    assert 64 < rows["sparsevlm 64"]["visual_tokens"] < 576  # equal tokens over the 4 layers
    kv = [rows[label]["kv_cache_bytes_per_sample"] for label in ("none", "visionzip 64", "voco")]
    assert kv == sorted(kv, reverse=True)
    for row in rows.values():
        assert row["prefill_ms_per_sample"] > 0 and row["ttft_ms_per_sample"] >= row["prefill_ms_per_sample"]
        results = row["results"]
        efficiency = json.loads(open(results.replace("_results.json", "_efficiency.json")).read())
        assert efficiency["overall"]["samples"] == QUESTIONS and efficiency["peak_memory_bytes"] > 0
    sparse = json.loads(open(rows["sparsevlm 64"]["results"].replace("_results.json", "_efficiency.json")).read())
    assert len(sparse["overall"]["layer_counts_mean"]) == 4
    assert all(len(batch["layer_counts"][0]) == 4 for batch in sparse["batches"])
    out = os.path.dirname(os.path.dirname(os.path.dirname(rows["none"]["results"])))
    table = open(os.path.join(out, "compare.md")).read()
    assert table.startswith("| setting | shapes_vqa score | shapes_vqa retention | visual tokens")
    assert f"| voco | {rows['voco']['scores']['shapes_vqa']:.3f} |" in table
    assert os.path.getsize(os.path.join(out, "compare.png")) > 0


def test_model_args_errors_name_the_field(offline):
    from slimvlm.eval.backend import SlimVLM

    with pytest.raises(ValueError, match="model_args compression must be JSON"):
        SlimVLM(pretrained=str(BUNDLED_MODEL), compression="{method: none}")
    with pytest.raises(ValueError, match=r"model_args compression: .*method"):
        SlimVLM(pretrained=str(BUNDLED_MODEL), compression='{"method": "zip"}')
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['compresion'\]"):
        SlimVLM(pretrained=str(BUNDLED_MODEL), compresion='{"method": "none"}')
    with pytest.raises(ValueError, match=r"model_args dtype must be one of .*'float16'.*got 'fp16'"):
        SlimVLM(pretrained=str(BUNDLED_MODEL), dtype="fp16")
    with pytest.raises(ValueError, match="load_in_4bit and load_in_8bit are exclusive"):
        SlimVLM(pretrained=str(BUNDLED_MODEL), load_in_4bit=True, load_in_8bit="true")


def test_model_args_keep_json_whole_and_compare_adds_the_baseline():
    text = 'pretrained=x,compression={"method":"sparsevlm","layers":[1,2,3],"budgets":[66,30,17]},dtype=float16'
    assert split_model_args(text) == {"pretrained": "x", "dtype": "float16",
                                      "compression": '{"method":"sparsevlm","layers":[1,2,3],"budgets":[66,30,17]}'}
    assert with_option(["--tasks", "a", "--model_args=p=1"], "--model_args", "p=2") == ["--tasks", "a", "--model_args", "p=2"]
    settings = compare_settings('{"vz": {"method": "visionzip", "tokens": 64}}')
    assert settings == {"none": {"compression": {"method": "none"}}, "vz": {"compression": {"method": "visionzip", "tokens": 64}}}
    with pytest.raises(ValueError, match="--compare must be a JSON object"):
        compare_settings("[1, 2]")


def test_the_makefile_installs_the_lmms_eval_this_package_names():
    from pathlib import Path

    from slimvlm.eval import LMMS_EVAL_VERSION

    makefile = (Path(__file__).parents[1] / "Makefile").read_text()
    assert f"LMMS_EVAL := lmms-eval=={LMMS_EVAL_VERSION}\n" in makefile


def test_only_eval_passes_unknown_arguments_on():
    with pytest.raises(SystemExit):
        main(["demo", "--tasks", "x"])


def test_eval_without_tasks_is_one_line_and_exit_1(capsys):
    """lmms-eval alone logs an error and exits 0."""
    assert main(["eval", "--model_args", f"pretrained={BUNDLED_MODEL}"]) == 1
    assert capsys.readouterr().err == ("slimvlm eval: error: eval needs --tasks TASK[,TASK...], e.g. --tasks shapes_vqa "
                                       "(the bundled task); `slimvlm eval --tasks list` lists every task\n")


def test_an_unknown_task_or_a_failed_evaluation_is_one_line_and_exit_1(offline, tasks, capsys):
    """lmms-eval alone prints a traceback and exits 0; --debug shows the traceback."""
    assert main(["eval", "--tasks", "no_such_task", "--include_path", str(tasks)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("slimvlm eval: error: unknown task(s): no_such_task; `slimvlm eval --tasks list` lists every task")
    assert err.count("\n") == 1 and "Traceback" not in err
    bad = ["eval", "--tasks", "shapes_vqa", "--include_path", str(tasks), "--limit", "2",
           "--model_args", f"pretrained={BUNDLED_MODEL},compression={{method: none}}"]
    assert main(bad) == 1
    err = capsys.readouterr().err
    assert err.startswith("slimvlm eval: error: model_args compression must be JSON") and err.count("\n") == 1, err
    with pytest.raises(ValueError, match="model_args compression must be JSON"):
        main([*bad, "--debug"])
