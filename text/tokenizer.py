"""Tokenizers for the text encoders: CLIP's byte-level BPE and T5's SentencePiece Unigram.

Both are built on the `tokenizers` library (no transformers, no sentencepiece at runtime).

CLIP (SD 1.5, and CLIP-L / OpenCLIP bigG in SD3 and FLUX): OpenAI CLIP's BPE (`assets/clip_tokenizer`,
README there). Text is NFC-normalised, whitespace runs collapsed, lower-cased, split with CLIP's regex, byte-level
encoded and merged with `</w>` word ends; the sequence is <|startoftext|> tokens <|endoftext|>, padded.
References: OpenAI CLIP `clip/simple_tokenizer.py`; transformers `CLIPTokenizer` (same normaliser and split).

T5 (SD3 / FLUX): SentencePiece Unigram, read from a `tokenizer.json` or straight from `spiece.model` (a protobuf,
parsed here by a small wire-format reader), then `</s>` appended and padded with id 0.
References: sentencepiece `sentencepiece_model.proto`; transformers `convert_slow_tokenizer.T5Converter`.
"""
import struct
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from weights import CheckpointError

CLIP_FOLDER = Path(__file__).resolve().parents[1] / "assets" / "clip_tokenizer"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"  # ids 49406, 49407 in CLIP's vocab.json
# CLIP's word split (simple_tokenizer.py): contractions, letter runs, single digits, runs of other non-space chars.
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _pad(rows: list[list[int]], length: int, pad_id: int, eos_id: int, bos_id: int | None = None) -> torch.Tensor:
    """[bos] + ids truncated to fit + [eos], padded with pad_id to `length`: (B, length) int64."""
    out = torch.full((len(rows), length), pad_id, dtype=torch.long)
    head = [] if bos_id is None else [bos_id]
    for i, ids in enumerate(rows):
        ids = head + ids[:length - len(head) - 1] + [eos_id]
        out[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


class CLIPTokenizer:
    """CLIP BPE. pad_id: 49407 (<|endoftext|>) for CLIP-L / SD 1.5, 0 for OpenCLIP bigG (SD3 `tokenizer_2`)."""

    def __init__(self, folder=CLIP_FOLDER, pad_id: int = 49407):
        folder = Path(folder)
        bpe = models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                   end_of_word_suffix="</w>", unk_token=EOS, fuse_unk=False)
        tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        # The split keeps only the regex matches (spaces vanish); ByteLevel then maps bytes to CLIP's unicode alphabet
        # without its own GPT-2 split (use_regex=False), as CLIP encodes each regex match as one word.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        # Special tokens written literally in a prompt are taken as such, as transformers does. That includes the pad
        # token: SD3's `tokenizer_2` pads with "!" (id 0), so there a "!" in a prompt becomes id 0, not BPE merges.
        specials = dict.fromkeys([BOS, EOS, bpe.id_to_token(pad_id)])  # ordered, no duplicates
        tok.add_special_tokens([AddedToken(s, normalized=False) for s in specials])
        self.tok, self.pad_id = tok, pad_id
        self.bos_id, self.eos_id = tok.token_to_id(BOS), tok.token_to_id(EOS)

    @classmethod
    def from_file(cls, path, pad_id: int | None = None) -> "CLIPTokenizer":
        """A CLIP-style tokenizer from a `tokenizer.json` (e.g. the toy world's WordLevel one): BOS / EOS looked up by
        name (<|startoftext|>, <|endoftext|>); pad_id None pads with EOS (as CLIP-L does)."""
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers' own error: one line for the user
            raise CheckpointError(f"{path}: not a tokenizer.json ({type(e).__name__}: {e})") from e
        tok.no_padding()  # _pad pads (a toy tokenizer.json may fix a T5 length: see T5Tokenizer.length)
        self = cls.__new__(cls)
        self.tok, self.bos_id, self.eos_id = tok, tok.token_to_id(BOS), tok.token_to_id(EOS)
        if self.bos_id is None or self.eos_id is None:
            raise CheckpointError(f"{path}: no {BOS} / {EOS} tokens; not a CLIP-style tokenizer")
        self.pad_id = self.eos_id if pad_id is None else pad_id
        return self

    def encode(self, texts: list[str], length: int = 77) -> torch.Tensor:
        """(B, length) ids: BOS, at most length-2 tokens, EOS, then pad_id."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        return _pad(rows, length, self.pad_id, self.eos_id, self.bos_id)


# ----------------------------------------------------------------------------------------------------------------- T5
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return out, i


def _fields(buf: bytes):
    """(field number, value) pairs of one protobuf message: ints for varints, bytes for everything else."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):  # fixed 64 / 32 bit
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        elif wire == 2:  # length-delimited: strings, bytes, sub-messages
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise CheckpointError(f"unsupported protobuf wire type {wire}")
        if i > len(buf):
            raise CheckpointError("truncated protobuf message")
        yield number, value


def read_spiece(path) -> dict:
    """The parts of a SentencePiece `ModelProto` a Unigram tokenizer needs (field numbers: sentencepiece_model.proto):
    pieces (1: piece 1, score 2, type 3), trainer_spec (2: model_type 3, unk_id 40), normalizer_spec
    (3: precompiled_charsmap 2). Proto defaults: type NORMAL=1, model_type UNIGRAM=1, unk_id 0."""
    names = {(2, 3): "model_type", (2, 40): "unk_id", (3, 2): "charsmap"}  # (message, field) -> name
    pieces, spec = [], {"model_type": 1, "unk_id": 0, "charsmap": b""}
    for number, value in _fields(Path(path).read_bytes()):
        if number == 1:
            piece = {"piece": "", "score": 0.0, "type": 1}
            for n, v in _fields(value):
                if n == 1:
                    piece["piece"] = v.decode("utf-8")
                elif n == 2:
                    piece["score"] = struct.unpack("<f", v)[0]  # float: fixed 32 bit, little-endian
                elif n == 3:
                    piece["type"] = v
            pieces.append(piece)
        elif number in (2, 3):
            spec.update({names[number, n]: v for n, v in _fields(value) if (number, n) in names})
    return {"pieces": pieces, **spec}


class T5Tokenizer:
    """T5's SentencePiece Unigram: ids + `</s>`, truncated (keeping `</s>` last) and padded with `<pad>` (id 0)."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.eos_id = tok.token_to_id("</s>")
        if self.eos_id is None:
            raise CheckpointError("no </s> token")
        self.pad_id = tok.token_to_id("<pad>") or 0
        # A tokenizer.json that pads to a fixed length (the toy world's does; released T5 ones don't) states the
        # sequence length its model was trained with: `length`, the default for callers. _pad does the padding.
        padding = tok.padding
        self.length = padding.get("length") if padding else None
        tok.no_padding()

    @classmethod
    def from_file(cls, path) -> "T5Tokenizer":
        """A `tokenizer.json`, a `spiece.model`, or a folder holding either (tokenizer.json preferred)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json" if (path / "tokenizer.json").exists() else path / "spiece.model"
        try:
            return cls(Tokenizer.from_file(str(path)) if path.suffix == ".json" else cls._from_spiece(path))
        except Exception as e:  # tokenizers' own errors, a truncated or foreign protobuf: one line for the user
            raise CheckpointError(f"{path}: not a T5 tokenizer.json / spiece.model ({type(e).__name__}: {e})") from e

    @staticmethod
    def _from_spiece(path) -> Tokenizer:
        """What transformers' T5 converter builds from `spiece.model`, without the sentencepiece package."""
        spm = read_spiece(path)
        if spm["model_type"] != 1:
            raise CheckpointError(f"{path}: not a Unigram SentencePiece model (model_type {spm['model_type']})")
        pieces = spm["pieces"]
        tok = Tokenizer(models.Unigram([(p["piece"], p["score"]) for p in pieces], unk_id=spm["unk_id"],
                                       byte_fallback=False))
        # SentencePiece drops trailing whitespace and collapses runs of spaces (remove_extra_whitespaces); leading
        # whitespace is handled by Metaspace, which only prepends "▁" where the text doesn't start with one.
        steps = [normalizers.Strip(left=False, right=True), normalizers.Replace(Regex(" {2,}"), "▁")]
        if spm["charsmap"]:  # nmt_nfkc and friends, compiled into the model file
            steps.insert(0, normalizers.Precompiled(spm["charsmap"]))
        tok.normalizer = normalizers.Sequence(steps)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        # Control and unknown pieces (<pad>, </s>, <unk>) are special tokens, user-defined pieces plain added tokens
        # (as transformers has them); then the 100 sentinels transformers appends (<extra_id_99> first, so
        # <extra_id_0> gets the last id).
        tok.add_tokens([AddedToken(p["piece"], normalized=False, special=p["type"] != 4)
                        for p in pieces if p["type"] in (2, 3, 4)])
        tok.add_special_tokens([AddedToken(f"<extra_id_{i}>", normalized=False) for i in range(99, -1, -1)])
        return tok

    def encode(self, texts: list[str], length: int) -> torch.Tensor:
        """(B, length) ids: at most length-1 tokens, `</s>`, then pad."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        rows = [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]
        return _pad(rows, length, self.pad_id, self.eos_id)


# ------------------------------------------------------------------------------------------------- finding tokenizers
def _is_clip_json(path: Path) -> bool:
    """A tokenizer.json that knows CLIP's BOS and EOS (a T5 tokenizer.json beside T5 weights does not)."""
    if not path.is_file():
        return False
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception:
        return False
    return tok.token_to_id(BOS) is not None and tok.token_to_id(EOS) is not None


def find_clip_tokenizer(path=None, pad_eos: bool = True) -> CLIPTokenizer:
    """The CLIP tokenizer that goes with the checkpoint `path` (a file or a folder; None: the bundled one).
    Looked for, first match wins: (1) in a folder: `tokenizer/` (a diffusers pipeline root: vocab.json + merges.txt,
    or tokenizer.json) and `tokenizer.json` in the folder itself; (2) for a file: `tokenizer.json` beside it.
    A tokenizer.json counts only if it has <|startoftext|> and <|endoftext|> (a T5 tokenizer.json in a text-encoders
    folder is skipped). Nothing found: the bundled CLIP BPE (`assets/clip_tokenizer`), the real CLIP vocabulary.
    pad_eos: pad with <|endoftext|> (CLIP-L, SD 1.5) or with id 0 (SD3's CLIP-G `tokenizer_2`)."""
    candidates = []
    if path is not None:
        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if path.is_dir():
            candidates += [folder / "tokenizer", folder / "tokenizer" / "tokenizer.json"]
        candidates.append(folder / "tokenizer.json")
    for c in candidates:
        if c.is_dir() and (c / "vocab.json").is_file() and (c / "merges.txt").is_file():
            return CLIPTokenizer(c, pad_id=49407 if pad_eos else 0)  # a diffusers copy of CLIP's BPE
        if c.suffix == ".json" and _is_clip_json(c):
            return CLIPTokenizer.from_file(c, None if pad_eos else 0)
    return CLIPTokenizer(pad_id=49407 if pad_eos else 0)  # 49407: <|endoftext|> in CLIP's vocab.json
