"""Evaluation of a RADLADS conversion: how much of the teacher did the student keep?

Every function takes any Hugging Face causal LM (teacher or student) the same way.
"""

from .copying import CopyResult, evaluate_copying
from .lm_eval_adapter import register_lm_eval_model
from .passkey import PasskeyPrompt, PasskeyResult, evaluate_passkey, make_passkey_prompt
from .perplexity import PerplexityResult, evaluate_perplexity
from .report import ModelResults, average_zero_shot, write_report
from .scoring import Loglik, Request, encode_pair, score_requests
from .speed import bench_generate
from .tasks import SAMPLES_DIR, TASKS, Doc, Task, evaluate_tasks, load_docs

__all__ = [
    "SAMPLES_DIR",
    "TASKS",
    "CopyResult",
    "Doc",
    "Loglik",
    "ModelResults",
    "PasskeyPrompt",
    "PasskeyResult",
    "PerplexityResult",
    "Request",
    "Task",
    "average_zero_shot",
    "bench_generate",
    "encode_pair",
    "evaluate_copying",
    "evaluate_passkey",
    "evaluate_perplexity",
    "evaluate_tasks",
    "load_docs",
    "make_passkey_prompt",
    "register_lm_eval_model",
    "score_requests",
    "write_report",
]
