"""train's data: the stdlib corpus, tokenisers, Megatron's IndexedDataset round trip, and the other
ways in (--data-path with a tokenizer.json, --mock-data, --hf-config)."""

import json
import os

import numpy
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_fold.cli import main
from megatron_fold.train import data
from megatron_fold.train.metrics import read_metrics

TEXTS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.\n" * 3,
         "héllo wörld — unicode survives\n"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    files = []
    for i, text in enumerate(TEXTS * 40):  # enough tokens for a few 64-token samples of each split
        path = root / f"doc{i:03d}.txt"
        path.write_text(text + f"# document {i}\n", encoding="utf-8")
        files.append(str(path))
    return files


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train([corpus[0], corpus[1], corpus[2]],
              trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    tok.save(path)
    return path


def test_byte_tokenizer_round_trips_and_ends_documents():
    tok = data.ByteTokenizer()
    for text in TEXTS:
        ids = tok.tokenize(text)
        assert ids == list(text.encode("utf-8")) and tok.detokenize(ids) == text
    assert tok.eod == 256 and tok.vocab_size == 257
    assert data.padded_vocab_size(257, tp=2) == 1024 and data.padded_vocab_size(257, tp=16) == 2048


@pytest.mark.parametrize("which", ["bytes", "tokenizer.json"])
def test_indexed_dataset_holds_each_document_then_eod(which, corpus, tokenizer_json, tmp_path):
    tok = data.load_tokenizer(None if which == "bytes" else tokenizer_json)
    prefix = data.build_indexed_dataset(str(tmp_path / "ds"), corpus[:6], tok)
    read = IndexedDataset(prefix)
    assert len(read) == 6
    for i, path in enumerate(corpus[:6]):
        with open(path, encoding="utf-8") as f:
            expected = tok.tokenize(f.read()) + [tok.eod]
        assert read[i].tolist() == expected
    stamp = os.path.getmtime(prefix + ".bin")
    data.build_indexed_dataset(prefix, corpus[:6], tok)  # the same files and tokenizer: reused
    assert os.path.getmtime(prefix + ".bin") == stamp
    assert data.check_indexed_dataset(prefix, tok.vocab_size) == sum(len(read[i]) for i in range(6))


def test_dataset_with_ids_beyond_the_vocabulary_is_refused(corpus, tmp_path):
    prefix = data.build_indexed_dataset(str(tmp_path / "bytes"), corpus[:3], data.ByteTokenizer())
    with pytest.raises(data.DataError, match="outside the tokenizer's vocabulary of 100"):
        data.check_indexed_dataset(prefix, vocab_size=100)


@pytest.mark.parametrize("largest,vocab_size,refused", [(99, 100, False), (100, 100, True), (0, 1, False),
                                                          (1, 1, True)])
def test_vocabulary_check_at_the_boundary(tmp_path, largest, vocab_size, refused):
    """Ids run 0 .. vocab - 1: the largest id equal to vocab - 1 is in, equal to vocab is out. The dataset
    is written with Megatron's own builder (not build_indexed_dataset), its largest id known by construction."""
    prefix = str(tmp_path / "ids")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.uint16)
    document = [largest, 0, largest // 2, largest]  # the largest id at both ends of the file
    builder.add_document(torch.tensor(document, dtype=torch.int64), [len(document)])
    builder.finalize(prefix + ".idx")
    if refused:
        with pytest.raises(data.DataError, match=f"token id {largest} is outside the tokenizer's vocabulary of "
                                                 f"{vocab_size}"):
            data.check_indexed_dataset(prefix, vocab_size)
    else:
        assert data.check_indexed_dataset(prefix, vocab_size) == len(document)


def test_default_corpus_is_the_standard_library():
    files = data.default_corpus_files()
    assert files == sorted(files) and len(files) > 100
    assert any(f.endswith(os.sep + "os.py") for f in files)


def _train(out, *args):
    return main(["train", "--no-progress", "--show-warnings", "--ranks", "2", "--layout", "ep2", "--steps", "2",
                 "--eval-interval", "0", "--eval-batches", "1", "--seq-length", "32", "--out", str(out), *args])


def test_trains_on_a_preprocessed_prefix_with_its_tokenizer(corpus, tokenizer_json, tmp_path):
    prefix = data.build_indexed_dataset(str(tmp_path / "ds"), corpus, data.load_tokenizer(tokenizer_json))
    assert _train(tmp_path / "out", "--data-path", prefix, "--tokenizer", tokenizer_json) == 0
    records = read_metrics(str(tmp_path / "out" / "metrics.jsonl"))
    # A BPE vocabulary of 300 padded to 1,024 rows: the first loss is near ln(1024) = 6.93.
    assert len(records) == 2 and 6.0 < records[0]["loss"] < 7.6


def test_trains_on_megatrons_mock_dataset(tmp_path):
    assert _train(tmp_path, "--mock-data") == 0
    assert len(read_metrics(str(tmp_path / "metrics.jsonl"))) == 2


def test_trains_a_model_read_from_a_hugging_face_config(tmp_path):
    cfg = {"model_type": "qwen2_moe", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "vocab_size": 151936, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
           "num_experts": 4, "shared_expert_intermediate_size": 32}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    assert _train(tmp_path / "out", "--hf-config", str(path), "--mock-data") == 0
    record = read_metrics(str(tmp_path / "out" / "metrics.jsonl"))[-1]
    assert sorted(record["moe"], key=int) == ["1", "2"]  # two MoE layers
    assert all(len(m["tokens_per_expert"]) == 4 for m in record["moe"].values())
    assert numpy.isfinite(record["loss"])
