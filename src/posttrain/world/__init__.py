"""The tiny world: synthetic arithmetic questions with verifiable answers, requests about the reply, imperfect
demonstrations and biased annotators.

``tasks`` makes and solves questions and splits them into train / held-out by problem; ``requests`` holds the
styles a prompt may ask for and ``follows_request``; ``gold`` is the ground-truth reward; ``datagen`` builds the
pretraining, SFT, preference, ranking, RL, outcome and process datasets. Pure standard library (no torch), so it is
cheap to import.
"""

from .gold import follows_format, gold_components, gold_reward, parse_final_answer
from .requests import STYLES, follows_request, request_of
from .tasks import WORLD_VERSION, Question, is_heldout, make_question, parse_question, questions, solve

__all__ = [
    "WORLD_VERSION",
    "Question",
    "make_question",
    "questions",
    "solve",
    "parse_question",
    "is_heldout",
    "gold_reward",
    "gold_components",
    "parse_final_answer",
    "follows_format",
    "follows_request",
    "request_of",
    "STYLES",
]
