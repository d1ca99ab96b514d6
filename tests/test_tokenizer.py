"""Tokenizers vs the references: transformers' CLIPTokenizer and a plain-Python CLIP BPE (OpenAI's algorithm);
sentencepiece / transformers for T5."""
import json
import random
import shutil
import unicodedata
from functools import lru_cache
from types import SimpleNamespace

import pytest
import regex
import torch

from text.tokenizer import CLIP_FOLDER, CLIPTokenizer, T5Tokenizer, read_spiece
from weights import CheckpointError

TEXTS = [
    "a photo of a cat",
    "A PHOTO of a Cat, with Punctuation!!! (and brackets) [x] {y} -- dash... ?!",
    "Café crème, naïve façade, Ångström, e\u0301 (combining accent), ÆØÅ, straße",
    "東京タワー 夜景 한국어 中文字符 العربية русский",
    "emoji 🐱🔥👍🏽 and ♥ ★ ™ © ½ ∞",
    "numbers 1234 and 3.14159, 1,000,000 and ٣٤ and ²",
    "don't it's we're they've I'm you'll he'd DON'T It'S rock'n'roll '''s",
    "multiple   spaces\n\nnewlines\ttabs\r\n  trailing   ",
    "",
    "   ",
    "a literal <|endoftext|> and <|startoftext|> inside",
    " ".join(f"word{i}" for i in range(60)),  # far more than 75 tokens: truncated
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "\u00a0non-breaking\u2003em-space\u200bzero-width",
]


@pytest.fixture(scope="module")
def ours():
    return CLIPTokenizer()


@pytest.mark.parametrize("pad_id", [49407, 0])
def test_clip_matches_transformers(ours, pad_id):
    from transformers import CLIPTokenizer as HFCLIPTokenizer
    pad = "<|endoftext|>" if pad_id == 49407 else "!"  # "!" is id 0: OpenCLIP bigG's pad (SD3 tokenizer_2)
    ref = HFCLIPTokenizer(vocab=str(CLIP_FOLDER / "vocab.json"), merges=str(CLIP_FOLDER / "merges.txt"),
                          pad_token=pad)
    assert ref.pad_token_id == pad_id
    tok = CLIPTokenizer(pad_id=pad_id)
    for length in (77, 16):
        want = torch.tensor(ref(TEXTS, padding="max_length", max_length=length, truncation=True).input_ids)
        got = tok.encode(TEXTS, length)
        for i, text in enumerate(TEXTS):
            assert got[i].tolist() == want[i].tolist(), (length, text)


def test_clip_known_values(ours):
    ids = ours.encode(["a photo of a cat", "1234", ""], 10)
    assert ids.dtype == torch.long and ids.shape == (3, 10)
    assert ids[0].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407, 49407, 49407]  # README value
    assert ids[1, :6].tolist() == [49406] + [ours.tok.token_to_id(f"{d}</w>") for d in "1234"] + [49407]
    assert ids[2].tolist() == [49406] + [49407] * 9
    long = ours.encode(["cat " * 100])[0]
    assert long.shape == (77,) and long[0] == 49406 and long[-1] == 49407 and (long[1:-1] == 2368).all()
    assert ours.encode("a photo of a cat").shape == (1, 77)
    # SD3's tokenizer_2 pads with "!" (id 0), which transformers then also matches inside prompts
    assert CLIPTokenizer(pad_id=0).encode(["wow!!"], 6)[0].tolist() == [49406, 2781, 0, 0, 49407, 0]
    assert ours.encode(["wow!!"], 5)[0].tolist() == [49406, 2781, ours.tok.token_to_id("!!</w>"), 49407, 49407]


# ---- an independent reference: OpenAI CLIP's simple_tokenizer algorithm in plain Python (minus ftfy/html,
# which neither transformers nor the diffusers pipelines apply) ----
def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


class _PlainBPE:
    def __init__(self):
        self.vocab = json.loads((CLIP_FOLDER / "vocab.json").read_text(encoding="utf-8"))
        lines = (CLIP_FOLDER / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
        self.ranks = {tuple(m.split()): i for i, m in enumerate(lines) if m}
        self.byte = _bytes_to_unicode()
        self.pat = regex.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]"""
                                 r"""|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
        self.bpe = lru_cache(maxsize=None)(self._bpe)

    def _bpe(self, token):
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word[:-1], word[1:], strict=True)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    new.append(word[i] + word[i + 1])
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = new
        return word

    def encode(self, text):
        text = regex.sub(r"\s+", " ", unicodedata.normalize("NFC", text)).strip().lower()
        ids = []
        for token in regex.findall(self.pat, text):
            if token in ("<|startoftext|>", "<|endoftext|>"):
                ids.append(self.vocab[token])
                continue
            ids += [self.vocab[p] for p in self.bpe("".join(self.byte[b] for b in token.encode("utf-8")))]
        return ids


def test_clip_matches_plain_python_bpe(ours):
    plain = _PlainBPE()
    texts = TEXTS + ["The quick brown fox jumps over the lazy dog's back; 42 years, 7 months.",
                     "portrait of an astronaut riding a horse, highly detailed, 8k, trending on artstation"]
    got = ours.encode(texts, 77)
    for i, text in enumerate(texts):
        ids = [49406] + plain.encode(text)[:75] + [49407]
        assert got[i, :len(ids)].tolist() == ids, text
        assert (got[i, len(ids):] == 49407).all()


# ---------------------------------------------------------------------------------------------------------------- T5
T5_TEXTS = [
    "a photo of a cat", "  leading and trailing spaces   ", "trailing space ", "trailing newline\n",
    "multiple     spaces\tand\ttabs\nand\n\nnewlines", "unicode: Café naïve straße ﬁ ① ｆｕｌｌｗｉｄｔｈ",
    "unknown characters ☃ 🐱 ж ∮ 東京", "numbers 1234 and 3.14, 2024!", "", " ", "kato rimu senlo " * 30,
    "UPPER lower MiXeD", "punctuation... (brackets) [x] {y} -- dash? \"quotes\"",
]


@pytest.fixture(scope="module")
def spiece(tmp_path_factory):
    """A small T5-style Unigram SentencePiece model (pad 0, eos 1, unk 2, no bos, nmt_nfkc) trained here."""
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    syl = ["ka", "to", "ri", "mu", "sen", "lo", "pha", "qu", "ex", "bri", "dor", "ton", "ing", "ed", "st", "ae"]
    words = ["".join(rng.choice(syl) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    words += "the a photo of cat dog café naïve straße 東京 1 2 3 4 . , ! ( ) [ ] - ?".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(3000)]
    (d / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(d / "corpus.txt"), model_prefix=str(d / "spiece"), vocab_size=400,
                                   hard_vocab_limit=False, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, character_coverage=1.0, num_threads=1, minloglevel=2)
    return d / "spiece.model"


def test_read_spiece(spiece):
    from sentencepiece import sentencepiece_model_pb2 as pb
    proto = pb.ModelProto()
    proto.ParseFromString(spiece.read_bytes())
    ours = read_spiece(spiece)
    assert [(p["piece"], p["score"], p["type"]) for p in ours["pieces"]] == \
        [(p.piece, p.score, p.type) for p in proto.pieces]
    assert ours["unk_id"] == proto.trainer_spec.unk_id == 2 and ours["model_type"] == 1
    assert ours["charsmap"] == proto.normalizer_spec.precompiled_charsmap and len(ours["charsmap"]) > 1000


def test_t5_matches_sentencepiece_and_transformers(spiece, tmp_path):
    import sentencepiece as spm
    from transformers import T5Tokenizer as HFT5Tokenizer
    from transformers.convert_slow_tokenizer import T5Converter
    sp = spm.SentencePieceProcessor(model_file=str(spiece))
    (tmp_path / "hf").mkdir()
    shutil.copy(spiece, tmp_path / "hf" / "spiece.model")
    hf = HFT5Tokenizer.from_pretrained(str(tmp_path / "hf"))
    hf.save_pretrained(str(tmp_path / "saved"))  # transformers 5 writes tokenizer.json
    assert (tmp_path / "saved" / "tokenizer.json").exists()
    # the converter behind the tokenizer.json files published with SD3 / FLUX (Precompiled + strip + Replace)
    stub = SimpleNamespace(vocab_file=str(spiece), _extra_ids=100, legacy=True, convert_tokens_to_ids=lambda t: 1)
    T5Converter(stub).converted().save(str(tmp_path / "converted.json"))
    ours = {"spiece": T5Tokenizer.from_file(spiece), "folder": T5Tokenizer.from_file(tmp_path / "hf"),
            "tokenizer.json": T5Tokenizer.from_file(tmp_path / "saved"),
            "converted.json": T5Tokenizer.from_file(tmp_path / "converted.json")}
    for length in (64, 8):
        want_hf = hf(T5_TEXTS, padding="max_length", max_length=length, truncation=True).input_ids
        for i, text in enumerate(T5_TEXTS):
            ids = sp.encode(text)[:length - 1] + [1]
            want_sp = ids + [0] * (length - len(ids))
            assert want_hf[i] == want_sp, text
            for name, tok in ours.items():
                assert tok.encode([text], length)[0].tolist() == want_sp, (name, length, text)
    assert any(2 in sp.encode(t) for t in T5_TEXTS)  # unknown characters really occur
    # transformers' special tokens (the bare converter output doesn't register the sentinels; saved files do)
    sentinels = "<extra_id_0> x <extra_id_99> </s> <unk>"
    want = hf([sentinels], padding="max_length", max_length=12).input_ids[0]
    for name, tok in ours.items():
        if name != "converted.json":
            assert tok.encode([sentinels], 12)[0].tolist() == want, name


def test_t5_bad_files(tmp_path):
    bad = tmp_path / "spiece.model"
    for data in (b"\x0a\xff\xff\xff", b"\x0a\x05ab"):  # a length running past the end; a truncated field
        bad.write_bytes(data)
        with pytest.raises(CheckpointError, match="spiece.model: not a T5 tokenizer"):
            T5Tokenizer.from_file(bad)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tokenizer.json: not a T5 tokenizer"):
        T5Tokenizer.from_file(tmp_path)


def test_find_clip_tokenizer_prefers_the_checkpoints_own(tmp_path):
    """A diffusers `tokenizer/` folder or a CLIP-style tokenizer.json beside a checkpoint wins; a T5 tokenizer.json
    does not count; nothing found -> the bundled CLIP BPE."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from text.tokenizer import find_clip_tokenizer
    texts = ["a red circle", "two words"]
    bundled = CLIPTokenizer().encode(texts)
    pipe = tmp_path / "pipe"
    shutil.copytree(CLIP_FOLDER, pipe / "tokenizer")
    assert torch.equal(find_clip_tokenizer(pipe).encode(texts), bundled)
    assert torch.equal(find_clip_tokenizer(pipe, pad_eos=False).encode(texts), CLIPTokenizer(pad_id=0).encode(texts))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "<|startoftext|>": 3, "<|endoftext|>": 4, "a": 5, "red": 6,
             "circle": 7}
    word = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "toy").mkdir()
    word.save(str(tmp_path / "toy" / "tokenizer.json"))
    (tmp_path / "toy" / "model.safetensors").write_bytes(b"")
    got = find_clip_tokenizer(tmp_path / "toy" / "model.safetensors").encode(["a red circle"], length=6)
    assert got.tolist() == [[3, 5, 6, 7, 4, 4]]  # BOS, words, EOS, padded with EOS
    t5 = HFTokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    (tmp_path / "t5").mkdir()
    t5.save(str(tmp_path / "t5" / "tokenizer.json"))
    assert torch.equal(find_clip_tokenizer(tmp_path / "t5").encode(texts), bundled)
