"""Let lm-evaluation-harness evaluate radlads students: `--model radlads`.

lm-eval is an optional dependency; it is imported only when the adapter is registered.

    from radlads.eval import register_lm_eval_model
    import lm_eval
    register_lm_eval_model()
    lm_eval.simple_evaluate(model="radlads", model_args="pretrained=./student", tasks=["piqa"])
"""

from __future__ import annotations

import functools
import importlib


@functools.cache  # the harness refuses to register one name twice
def register_lm_eval_model(name: str = "radlads") -> type:
    """Register an `HFLM` subclass under `name` and return it."""
    try:
        from lm_eval.api.registry import register_model
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise ImportError(
            "lm-evaluation-harness is not installed; `pip install lm-eval` to evaluate with it"
        ) from err
    # Importing the model package registers the "radlads" model type with the Auto classes, so
    # HFLM's AutoModelForCausalLM.from_pretrained can build the student.
    importlib.import_module("radlads.models")

    @register_model(name)
    class RadladsLM(HFLM):
        """HFLM for radlads checkpoints; loglikelihood tasks right-pad, which the recurrent student needs."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # The harness scores each batch with one forward and reads only its logits: each would
            # otherwise build a recurrent state (and a hybrid's KV cache) and drop it. generate()
            # asks for its cache itself.
            self.model.config.use_cache = False

    return RadladsLM
