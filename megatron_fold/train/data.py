"""Training data for `megatron-fold train`: the default corpus, tokenisation, Megatron's datasets.

The default corpus is the Python standard library's own source files (`Lib/*.py` of the running
interpreter): real text (English prose in docstrings and comments, plus code) that is present on every
machine with Python, identical for a given Python version, and needs no download, which a CI runner
or an air-gapped cluster node may not allow. About 4 MB at Python 3.12, one document per file.

Tokenisation is byte-level by default (256 byte values + end-of-document), or a local Hugging Face
`tokenizer.json` (the `tokenizers` package). Documents are written with Megatron's own
IndexedDatasetBuilder into a `.bin/.idx` pair, exactly the format Megatron-LM's preprocess_data.py
writes, so `--data-path PREFIX` takes either. Samples come from Megatron's GPTDataset (train and
validation splits of the documents) or MockGPTDataset (`--mock-data`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import sysconfig

import numpy
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.core.tokenizers import MegatronTokenizerBase

__all__ = ["DataError", "ByteTokenizer", "JsonTokenizer", "load_tokenizer", "default_corpus_files",
           "build_indexed_dataset", "check_indexed_dataset", "Datasets", "build_datasets", "global_batch",
           "padded_vocab_size"]


class DataError(ValueError):
    """A data prefix, index or tokenizer that cannot be used (names the file and the problem)."""


class ByteTokenizer(MegatronTokenizerBase):
    """UTF-8 bytes as tokens 0-255, end-of-document 256. No vocabulary file, no download."""

    EOD = 256

    def __init__(self):
        super().__init__(path="bytes", config={})
        # Megatron's datasets name their index cache by the tokenizer's identifiers.
        self.unique_identifiers = {"class": type(self).__name__}

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    @property
    def vocab(self):
        return {bytes([i]).decode("latin-1"): i for i in range(256)}

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eod(self) -> int:
        return self.EOD

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("the byte tokenizer has no chat template")


class JsonTokenizer(MegatronTokenizerBase):
    """A local Hugging Face `tokenizer.json`, through the `tokenizers` package."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise DataError("--tokenizer needs the `tokenizers` package: pip install tokenizers") from e
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - the library raises plain Exceptions with its reason
            raise DataError(f"cannot read tokenizer {path}: {e}") from e
        super().__init__(path=path, config={})
        self.unique_identifiers = {"class": type(self).__name__, "path": os.path.abspath(path)}
        eod = next((self._tok.token_to_id(t) for t in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
                    if self._tok.token_to_id(t) is not None), None)
        self._eod = eod if eod is not None else self._tok.get_vocab_size()

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def detokenize(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])

    @property
    def vocab(self):
        return self._tok.get_vocab()

    @property
    def vocab_size(self) -> int:
        return max(self._tok.get_vocab_size(), self._eod + 1)

    @property
    def eod(self) -> int:
        return self._eod

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("chat templates are not used for pretraining")


def load_tokenizer(path: str | None) -> MegatronTokenizerBase:
    if path is None:
        return ByteTokenizer()
    if not os.path.isfile(path):
        raise DataError(f"--tokenizer {path}: no such file (give a Hugging Face tokenizer.json)")
    return JsonTokenizer(path)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Megatron-LM pads the vocabulary to a multiple of 128 x TP (embedding rows split over TP). We pad
    to 128 x max(TP, 8), so layouts up to TP 8 build the same embedding: a checkpoint, or the initial
    weights of --compare-layouts, then moves between them."""
    step = multiple * max(tp, 8)
    return -(-vocab_size // step) * step


def default_corpus_files() -> list[str]:
    """The standard library's top-level modules, sorted: the same list on every run of this Python."""
    stdlib = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(stdlib, "*.py")))
    if not files:
        raise DataError(f"no Python source files under {stdlib}: pass --data-path or --mock-data")
    return files


def build_indexed_dataset(prefix: str, files: list[str], tokenizer: MegatronTokenizerBase) -> str:
    """Tokenise `files` (one document each, end-of-document appended) into `prefix`.bin/.idx with
    Megatron's IndexedDatasetBuilder; reuses an existing pair built from the same files and tokenizer.
    Written under temporary names and renamed, so an interrupted build leaves nothing half-written."""
    stamp = {"files": [os.path.basename(f) for f in files], "sizes": [os.path.getsize(f) for f in files],
             "tokenizer": tokenizer.path, "vocab_size": tokenizer.vocab_size}
    stamp_path = prefix + ".json"
    if all(os.path.exists(prefix + ext) for ext in (".bin", ".idx", ".json")):
        with open(stamp_path) as f:
            if json.load(f) == stamp:
                return prefix
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    dtype = numpy.uint16 if tokenizer.vocab_size < 65500 else numpy.int32
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            ids = tokenizer.tokenize(f.read())
        builder.add_document(torch.tensor(ids + [tokenizer.eod], dtype=torch.int64), [len(ids) + 1])
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    with open(tmp + ".json", "w") as f:  # atomic too: ranks of one torchrun job may build side by side
        json.dump(stamp, f)
    os.replace(tmp + ".json", stamp_path)
    return prefix


def check_indexed_dataset(prefix: str, vocab_size: int) -> int:
    """Open `prefix`.bin/.idx the way GPTDataset will and return its token count; raise DataError
    naming the file on a missing or corrupt pair, or token ids beyond the tokenizer's vocabulary."""
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DataError(f"--data-path {prefix}: {prefix + ext} does not exist (a Megatron dataset is a "
                            ".bin/.idx pair, e.g. from Megatron-LM's tools/preprocess_data.py)")
    try:
        dataset = IndexedDataset(prefix, mmap=True)
        sizes = dataset.sequence_lengths
        if len(sizes) == 0:
            raise DataError(f"--data-path {prefix}: the dataset holds no documents")
        # Every token, in chunks: one id beyond the vocabulary would fail deep inside the embedding.
        tokens = numpy.memmap(prefix + ".bin", dtype=dataset.index.dtype, mode="r")
        chunk = 1 << 24
        largest = max(int(tokens[i:i + chunk].max()) for i in range(0, len(tokens), chunk))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - Megatron asserts on a bad header; name the file instead
        raise DataError(f"--data-path {prefix}: cannot read {prefix}.idx/.bin ({type(e).__name__}: {e}); "
                        "is it a Megatron IndexedDataset?") from e
    if largest >= vocab_size:
        raise DataError(f"--data-path {prefix}: token id {largest} is outside the tokenizer's vocabulary of "
                        f"{vocab_size}; pass the tokenizer the dataset was made with (--tokenizer)")
    return int(numpy.sum(sizes))


@dataclasses.dataclass
class Datasets:
    train: GPTDataset
    valid: GPTDataset | None


def build_datasets(prefix: str | None, tokenizer, *, seq_length: int, train_samples: int, valid_samples: int,
                   seed: int, cache_dir: str, split: str = "98,2,0") -> Datasets:
    """Megatron's GPTDataset over `prefix` (MockGPTDataset when None), built the way Megatron-LM builds
    it: collectively on every rank, the index cache written by rank 0 first."""
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([prefix], None) if prefix else None,
        split=split, path_to_cache=cache_dir, tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    cls = MockGPTDataset if prefix is None else GPTDataset
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, [train_samples, valid_samples, 0], lambda: True,
                                                    config).build()
    return Datasets(train=train, valid=valid)


def global_batch(dataset: GPTDataset, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples [step * batch_size, (step + 1) * batch_size) as tokens [batch, seq + 1] (inputs with the
    last label appended, the layout micro_batches expects) and the loss mask [batch, seq]."""
    tokens, masks = [], []
    for i in range(step * batch_size, (step + 1) * batch_size):
        sample = dataset[i % len(dataset)]
        tokens.append(torch.cat([sample["tokens"], sample["labels"][-1:]]))
        masks.append(sample["loss_mask"])
    return torch.stack(tokens), torch.stack(masks)
