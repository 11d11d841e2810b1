"""The LLM experiment's text: Debian's man pages as plain text, a fixed split by page, and
fixed-length token blocks for next-token training and held-out perplexity.

The far domain is Polish: the manpages-pl translations (manpages-l10n 4.18, GPL-3+), which
SmolLM2-135M, trained on English web text and code, reads at several times its perplexity on
English (docs/results/llm/base_perplexity.json).  The English held-out set, for forgetting, is
the English originals of the Linux man-pages project (`manpages`, sections 2-7) whose page names
have no page in the far-domain corpus, so that nothing learnt from a translation is its answer.
Both are Debian packages:  apt-get install manpages manpages-pl
"""
import gzip
import re
import zlib
from pathlib import Path

FAR_DIR = "/usr/share/man/pl"          # manpages-pl installs here
ENGLISH_DIR = "/usr/share/man"         # manpages installs man2 .. man7 here
ENGLISH_SECTIONS = ("man2", "man3", "man4", "man5", "man6", "man7")
HELD_OUT_EVERY = 10                    # one page in ten, chosen by a hash of its name, is held out
INSTALL_HINT = "install the corpus with: apt-get install manpages manpages-pl (or pass --far_dir / --english_dir)"

# roff macros whose arguments are running text (section titles, fonts, paragraph tags)
TEXT_MACROS = {"SH", "SS", "B", "I", "BI", "BR", "IB", "IR", "RB", "RI", "SM", "SB", "IP", "TQ", "UR", "MT", "Nm",
               "Nd", "Sh", "Ss", "Em", "Sy", "Ar", "Fl", "Pa", "Xr", "Dq", "Sq", "Ql", "It"}
NAMED_GLYPHS = {"em": "\u2014", "en": "\u2013", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d", "oq": "\u2018",
                "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "mi": "-", "hy": "-", "ga": "`",
                "ha": "^", "ti": "~", "rs": "\\", "fo": "\u00ab", "fc": "\u00bb", "Fo": "\u00ab", "Fc": "\u00bb",
                "<=": "\u2264", ">=": "\u2265", "->": "\u2192", "mu": "\u00d7", "de": "\u00b0", "ct": "\u00a2"}
ESCAPES = re.compile(r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[-+]?\d+|\*(?:\[[^\]]*\]|\(..|.)|\(..|\[[^\]]*\]|.)")


def _escape(m: re.Match) -> str:
    e = m.group(0)[1:]
    if e[0] in "fs*":                               # font, size, string register: no text
        return ""
    if e[0] in "([":
        name = e[1:3] if e[0] == "(" else e[1:-1]
        return NAMED_GLYPHS.get(name, "")
    return {"-": "-", "e": "\\", "~": " ", " ": " ", "0": " ", "(": ""}.get(e, "")  # \& \| \^ \c \% \: ...: nothing


BREAK_MACROS = {"SH", "SS", "PP", "P", "LP", "TP", "IP", "TQ", "br", "sp", "Sh", "Ss", "Pp", "It", "nf", "fi", "EX", "EE"}


def roff_to_text(source: str) -> str:
    """The running text of a man page's roff source, filled as roff fills it (a newline in the
    source is a space; a paragraph or section macro starts a new line): macro lines dropped, except
    those whose arguments are text; inline escapes resolved to their glyph or dropped.  "" for a .so stub.
    A section title starts a new line but runs on into its section's first line ("OPIS Wypisanie ..."),
    which is how the committed runs saw the text."""
    paragraphs, lines, skipping = [], [], False
    for line in source.splitlines():
        if skipping:                                 # inside a .de macro definition
            skipping = not line.startswith("..")
            continue
        if line.startswith((".\\\"", "'\\\"", ".\\#")) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            name, _, args = line[1:].strip().partition(" ")
            if name == "so":
                return ""                            # a page that only points to another one
            if name in ("de", "de1", "am"):
                skipping = True
                continue
            if name in BREAK_MACROS and lines:
                paragraphs.append(" ".join(lines))
                lines = []
            if name not in TEXT_MACROS:
                continue
            line = args.replace('"', "")
        line = ESCAPES.sub(_escape, line).strip()
        if line:
            lines.append(line)
    return "\n".join(paragraphs + [" ".join(lines)] if lines else paragraphs)


def read_pages(root, sections=None) -> dict:
    """{page name: plain text} of every gzipped man page under `root` (in `sections` if given),
    sorted by name; pages that are .so stubs or empty are left out."""
    root = Path(root)
    dirs = [root / s for s in sections] if sections else [root]
    files = sorted(f for d in dirs if d.is_dir() for f in d.rglob("*.gz"))
    pages = {}
    for f in files:
        text = roff_to_text(gzip.decompress(f.read_bytes()).decode("utf-8", errors="replace"))
        if text:
            pages[f.name.removesuffix(".gz")] = text
    return pages


def is_held_out(name: str) -> bool:
    """A fixed split by page (not by --seed): every run is scored on the same held-out pages,
    and no page contributes to both sides."""
    return zlib.crc32(name.encode()) % HELD_OUT_EVERY == 0


def page_stem(name: str) -> str:
    """A page's name without its section: "open.2" and "open.2.pl" are both "open"."""
    return name.split(".")[0]


def split_pages(pages: dict) -> tuple:
    """(training pages, held-out pages), as lists of texts in name order."""
    train = [t for n, t in pages.items() if not is_held_out(n)]
    held = [t for n, t in pages.items() if is_held_out(n)]
    return train, held


def english_pages(english: dict, far: dict) -> list:
    """The English pages whose stem has no page in the far-domain corpus, as texts in name order."""
    taken = {page_stem(n) for n in far}
    return [t for n, t in english.items() if page_stem(n) not in taken]


def blocks(texts, encode, block: int, eos: int, limit: int = 0) -> list:
    """Fixed-length token blocks of `block` ids: the texts tokenized one by one, each followed by
    `eos`, concatenated and cut; the ragged tail is dropped.  limit > 0: the first `limit` blocks."""
    ids, out = [], []
    for text in texts:
        ids.extend(encode(text))
        ids.append(eos)
        while len(ids) >= block:
            out.append(ids[:block])
            ids = ids[block:]
            if limit and len(out) == limit:
                return out
    return out
