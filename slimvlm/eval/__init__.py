"""lmms-eval integration: the `slimvlm` model backend, efficiency logging, the compare table, the shapes task.

Not shipped with checkpoints and never imported by the flat modules. Needs the `[eval]` extra plus lmms-eval
itself, installed without its dependencies (they include torchvision and timm, which this project must not
pull in):

    pip install -e ".[eval]" && pip install --no-deps lmms-eval==0.7.3

lmms-eval 0.7 finds models in its registry (`lmms_eval.models.MODEL_REGISTRY_V2`), filled from its own list
and from the `lmms_eval.models` entry-point group. slimvlm declares that entry point (`manifest` below), so a
plain `lmms-eval --model slimvlm ...` works once slimvlm is installed; `slimvlm eval ...` also registers
the backend explicitly before handing its arguments to lmms-eval's CLI, so it works from a source checkout too.
Importing this package does not import lmms-eval.
"""

from __future__ import annotations

MODEL_ID = "slimvlm"
BACKEND_CLASS = "slimvlm.eval.backend.SlimVLM"
LMMS_EVAL_VERSION = "0.7.3"
INSTALL_HINT = f'pip install -e ".[eval]" && pip install --no-deps lmms-eval=={LMMS_EVAL_VERSION}'


def manifest():
    """The backend's lmms-eval registration (the payload of the `lmms_eval.models` entry point)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=BACKEND_CLASS)


def register() -> None:
    """Register the `slimvlm` backend with the installed lmms-eval (idempotent)."""
    try:
        from lmms_eval.models import MODEL_REGISTRY_V2
    except ImportError as error:
        raise ImportError(f"slimvlm eval needs lmms-eval and its core dependencies ({error}); install them with: "
                          f"{INSTALL_HINT}") from error
    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
