"""`slimvlm eval`: register the backend, hand the arguments to lmms-eval's CLI, write the efficiency log next
to lmms-eval's results; `--compare` runs the same tasks once per compression setting and writes one table.

    slimvlm eval --tasks shapes_vqa --output_path out --model_args pretrained=PATH,compression={"method":"none"}
    slimvlm eval --compare settings.json --tasks shapes_vqa --output_path out --model_args pretrained=PATH

`--model slimvlm` is added when no --model is given, and the bundled task folder (slimvlm/eval/tasks) as
--include_path when none is given. Every other argument is lmms-eval's (`lmms-eval eval --help`).
"""

from __future__ import annotations

import json
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from . import MODEL_ID, register

TASKS_DIR = Path(__file__).parent / "tasks"
COMPARE_EXAMPLE = '{"none": {"method": "none"}, "visionzip 64": {"method": "visionzip", "tokens": 64}}'


# ---------------------------------------------------------------------------------------- argument lists


def option(args: list[str], name: str) -> str | None:
    """The value of `name` in an argument list (`--name value` or `--name=value`), else None."""
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    return None


def with_option(args: list[str], name: str, value: str) -> list[str]:
    """`args` with `name` set to `value` (replaced where it was, appended otherwise)."""
    out, index, found = [], 0, False
    while index < len(args):
        arg = args[index]
        if arg == name:
            out += [name, value]
            index, found = index + 2, True
            continue
        if arg.startswith(name + "="):
            out += [name, value]
            found = True
        else:
            out.append(arg)
        index += 1
    return out if found else out + [name, value]


def split_model_args(text: str) -> dict[str, str]:
    """lmms-eval's `k=v,k=v` with JSON values kept whole (commas inside braces, brackets or quotes do not split)."""
    parts, current, depth, quote = [], "", 0, None
    for char in text:
        if quote:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    pairs = {}
    for part in filter(str.strip, parts):
        if "=" not in part:
            raise ValueError(f"--model_args must be key=value pairs separated by commas, got {part!r} in {text!r}")
        key, value = part.split("=", 1)
        pairs[key.strip()] = value
    return pairs


def join_model_args(pairs: dict) -> str:
    def text(value) -> str:
        return json.dumps(value, separators=(",", ":")) if isinstance(value, (dict, list)) else str(value)

    return ",".join(f"{key}={text(value)}" for key, value in pairs.items())


def lmms_arguments(args: list[str]) -> list[str]:
    """The user's arguments plus this command's defaults: --model slimvlm and the bundled tasks folder."""
    args = list(args)
    if args and not args[0].startswith("-"):  # a lmms-eval subcommand (`slimvlm eval tasks list`): as is
        return args
    if option(args, "--model") is None:
        args = ["--model", MODEL_ID, *args]
    if option(args, "--include_path") is None:
        args += ["--include_path", str(TASKS_DIR)]
    return args


# ---------------------------------------------------------------------------------------- one run


LIST_TASKS = ("list", "list_groups", "list_subtasks", "list_tags")


def check_tasks_given(args: list[str]) -> None:
    """ValueError unless an evaluation names its tasks (lmms-eval itself only logs an error and exits 0)."""
    if (args and not args[0].startswith("-")) or {"-h", "--help"} & set(args) or option(args, "--config") is not None:
        return  # a lmms-eval subcommand, its help, or a config file with the tasks
    if not option(args, "--tasks"):
        raise ValueError("eval needs --tasks TASK[,TASK...], e.g. --tasks shapes_vqa (the bundled task); "
                         "`slimvlm eval --tasks list` lists every task")


class _EvaluationFailed(BaseException):
    """Carries an error of one lmms-eval evaluation past lmms-eval's own `except Exception` (which prints a
    traceback and carries on with exit status 0), so that the CLI reports it in one line."""

    def __init__(self, error: Exception):
        super().__init__(error)
        self.error = error


@contextmanager
def _evaluation_errors_raised():
    """While lmms-eval runs: an exception of an evaluation (`lmms_eval.__main__.cli_evaluate_single`) leaves
    lmms-eval as `_EvaluationFailed` instead of being printed as a traceback; the attribute is restored on exit."""
    import lmms_eval.__main__ as lmms_main

    original = lmms_main.cli_evaluate_single

    def evaluate_single(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except Exception as error:
            if getattr(args[0] if args else kwargs.get("args"), "verbosity", None) == "DEBUG":
                raise  # lmms-eval's own --verbosity DEBUG: its traceback, as it documents
            raise _EvaluationFailed(error) from error

    lmms_main.cli_evaluate_single = evaluate_single
    try:
        yield
    finally:
        lmms_main.cli_evaluate_single = original


def _unknown_tasks(error: Exception) -> Exception:
    """lmms-eval's "Tasks not found: a, b. Try `lmms-eval --tasks ...`" as a slimvlm eval message."""
    found = re.match(r"Tasks not found: (.*?)\. Try", str(error))
    if found is None:
        return error
    return ValueError(f"unknown task(s): {found.group(1)}; `slimvlm eval --tasks list` lists every task (bundled: "
                      f"shapes_vqa; a task folder of your own: --include_path DIR)")


def _run_lmms_eval(args: list[str]) -> None:
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    saved = sys.argv
    sys.argv = ["lmms-eval", *args]
    try:
        with _evaluation_errors_raised():
            lmms_eval_main()
    except _EvaluationFailed as failed:
        error = _unknown_tasks(failed.error)
        if error is failed.error:
            raise error from None
        raise error from failed.error
    except SystemExit as exit:
        if exit.code not in (0, None):
            raise RuntimeError(f"lmms-eval exited with status {exit.code}") from None
    finally:
        sys.argv = saved


def evaluate(args: list[str]) -> tuple[Path | None, list[dict]]:
    """One lmms-eval run through its CLI. Returns lmms-eval's results file (None without --output_path) and
    the efficiency summaries of the slimvlm backends it created; writes them as `<date>_efficiency.json`
    next to the results."""
    from . import backend

    check_tasks_given(args)
    register()
    args = lmms_arguments(args)
    output_path = option(args, "--output_path")
    started = time.time()
    first = len(backend.RUNS)
    _run_lmms_eval(args)
    logs = backend.RUNS[first:]
    if args and not args[0].startswith("-"):
        return None, []
    if output_path is None:
        for log in logs:
            print(json.dumps({"efficiency": log.summary()}, indent=2))
        return None, [log.summary() for log in logs]
    written = [p for p in Path(output_path).rglob("*_results.json") if p.stat().st_mtime >= started - 1]
    if not written:
        raise RuntimeError(f"lmms-eval wrote no results under {output_path} (its error is printed above; "
                           "add --verbosity DEBUG for the traceback)")
    results = max(written, key=lambda p: p.stat().st_mtime)
    efficiency = [log.to_dict() for log in logs]
    target = results.with_name(results.name.removesuffix("_results.json") + "_efficiency.json")
    target.write_text(json.dumps(efficiency[0] if len(efficiency) == 1 else efficiency, indent=2))
    print(f"slimvlm eval: efficiency log {target}")
    return results, [log.summary() for log in logs]


# ---------------------------------------------------------------------------------------- compare


def compare_settings(spec: str) -> dict[str, dict]:
    """`--compare`: a JSON object label -> setting, inline or in a file. A setting is a compression dict
    (it has "method") or model_args overrides such as {"pretrained": "...", "compression": {...}}.
    "none" (no compression, the base model_args) is added first when no setting has method none."""
    path = Path(spec)
    text = path.read_text() if not spec.lstrip().startswith("{") and path.is_file() else spec
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--compare must be a JSON object (inline or a file) such as '{COMPARE_EXAMPLE}', got "
                         f"{spec!r} ({error})") from error
    if not isinstance(settings, dict) or not settings:
        raise ValueError(f"--compare must be a JSON object (non-empty) label -> setting such as '{COMPARE_EXAMPLE}', got {spec!r}")
    overrides = {}
    for label, setting in settings.items():
        if not isinstance(setting, dict):
            raise ValueError(f"--compare setting {label!r} must be a JSON object (a compression dict or model_args "
                             f"overrides), got {setting!r}")
        overrides[label] = {"compression": setting} if "method" in setting else dict(setting)
    if not any(o.get("compression", {}).get("method") == "none" for o in overrides.values()):
        overrides = {"none": {"compression": {"method": "none"}}, **overrides}
    return overrides


def _scores(results: dict) -> dict[str, float]:
    """task -> its first metric (lmms-eval keys look like "exact_match,none"; stderr entries skipped)."""
    scores = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            if "_stderr" not in key and key != "alias" and isinstance(value, (int, float)):
                scores[task] = float(value)
                break
    return scores


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "setting"


def compare(args: list[str], spec: str) -> dict:
    """Run the tasks once per setting; write compare.json, compare.md and compare.png under --output_path."""
    settings = compare_settings(spec)
    output_path = option(args, "--output_path")
    model_args = option(args, "--model_args")
    if output_path is None or model_args is None:
        raise ValueError("--compare needs --output_path DIR and --model_args pretrained=...; each setting's run goes "
                         "to DIR/<label>/ and the table to DIR/compare.md")
    base = split_model_args(model_args)
    rows = []
    for label, overrides in settings.items():
        run_args = with_option(args, "--model_args", join_model_args({**base, **overrides}))
        run_args = with_option(run_args, "--output_path", str(Path(output_path) / _slug(label)))
        results_file, summaries = evaluate(run_args)
        results = json.loads(results_file.read_text())
        overall = summaries[-1]["overall"] if summaries else {}
        rows.append({"label": label, "model": summaries[-1]["model"] if summaries else None,
                     "compression": summaries[-1]["compression"] if summaries else overrides.get("compression"),
                     "scores": _scores(results), "samples": overall.get("samples"),
                     "visual_tokens": overall.get("visual_tokens_per_sample"),
                     "prefill_ms_per_sample": overall.get("prefill_ms_per_sample"),
                     "ttft_ms_per_sample": overall.get("ttft_ms_per_sample"),
                     "kv_cache_bytes_per_sample": overall.get("kv_cache_bytes_per_sample"),
                     "peak_memory_bytes": summaries[-1]["peak_memory_bytes"] if summaries else None,
                     "results": str(results_file)})
    baseline = next(r for r in rows if (r["compression"] or {}).get("method") == "none")
    for row in rows:
        row["retention"] = {task: (score / baseline["scores"][task] if baseline["scores"].get(task) else None)
                            for task, score in row["scores"].items()}
    table = {"baseline": baseline["label"], "rows": rows}
    out = Path(output_path)
    (out / "compare.json").write_text(json.dumps(table, indent=2))
    (out / "compare.md").write_text(markdown_table(rows) + "\n")
    plot(rows, out / "compare.png")
    print(markdown_table(rows))
    print(f"slimvlm eval --compare: wrote {out / 'compare.md'}, compare.json and compare.png")
    return table


def _number(value, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    tasks = list(dict.fromkeys(task for row in rows for task in row["scores"]))
    head = ["setting", *[f"{t} score" for t in tasks], *[f"{t} retention" for t in tasks],
            "visual tokens / sample", "prefill ms / sample", "TTFT ms / sample", "KV cache KiB / sample"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        kv = row["kv_cache_bytes_per_sample"]
        cells = [row["label"], *[_number(row["scores"].get(t), 3) for t in tasks],
                 *[_number(row["retention"].get(t), 3) for t in tasks], _number(row["visual_tokens"]),
                 _number(row["prefill_ms_per_sample"]), _number(row["ttft_ms_per_sample"]),
                 _number(None if kv is None else kv / 1024)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Score against visual tokens per sample, one line per task, each point labelled with its setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    tasks = list(dict.fromkeys(task for row in rows for task in row["scores"]))
    for task in tasks:
        points = [(row["visual_tokens"], row["scores"][task], row["label"]) for row in rows
                  if task in row["scores"] and row["visual_tokens"]]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o", label=task)
        for x, y, label in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual tokens per sample (SparseVLM: equal tokens)")
    ax.set_ylabel("score")
    ax.set_title("accuracy vs visual tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_eval(lmms_args: list[str], compare_spec: str | None = None) -> int:
    if compare_spec is not None:
        compare(lmms_args, compare_spec)
    else:
        evaluate(lmms_args)
    return 0
