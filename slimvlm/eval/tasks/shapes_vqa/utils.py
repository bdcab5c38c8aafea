"""Hooks of the shapes_vqa task: the question is the prompt text (the slimvlm backend wraps it in the model's
prompt layout, which for the bundled model gives shapes.build_prompt), scoring is the demo's exact match."""

from slimvlm.demo.shapes import normalize_answer


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(normalize_answer(results[0]) == doc["answer"])}
