#!/usr/bin/env bash
# Rebuilds data/kjv_excerpt.txt, the built-in default corpus of `make demo`, from Debian's
# packages: the King James Version (public domain) of `sword-text-kjv`, decoded by `mod2imp`
# of `libsword-utils`. Nothing is installed: the .deb files are downloaded with `apt-get
# download` and unpacked with `dpkg -x` into a temporary folder (no root needed; run
# `apt-get update` first on a fresh machine).
#
# Output: the books listed in BOOKS, one verse per line (no verse numbers), a blank line
# between chapters, each book headed by its name in capitals. The OSIS markup is removed:
# every <note>...</note> (translators' footnotes) and <title>...</title> becomes a space,
# other tags are dropped keeping their text, leftover USFM markers (\nd, \+nd*) are dropped,
# the editorial paragraph sign ¶ is removed, and the typographic apostrophe ’ becomes '.
#
# Usage: scripts/make_demo_text.sh [OUTPUT]   (default: data/kjv_excerpt.txt in the repo)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="$(realpath -m "${1:-$repo/data/kjv_excerpt.txt}")"
books="Ruth,Esther,Jonah,Ecclesiastes,Mark,James"

work="$(mktemp -d)"
chmod 755 "$work"  # apt-get download runs as _apt when it can; let it write here
trap 'rm -rf "$work"' EXIT
cd "$work"

# mod2imp's shared libraries that a plain Debian 12 lacks come along with it.
pkgs=(sword-text-kjv libsword-utils libsword1.9.0 libsword-common libclucene-core1v5)
apt-get download "${pkgs[@]}" >/dev/null
for deb in ./*.deb; do dpkg -x "$deb" root; done

export LD_LIBRARY_PATH="$work/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd root/usr/bin/mod2imp | grep -q "not found"; then
  echo "make_demo_text: mod2imp still lacks libraries:" >&2
  ldd root/usr/bin/mod2imp | grep "not found" >&2
  echo "install them with apt-get (or add their packages to pkgs in this script)" >&2
  exit 1
fi
SWORD_PATH="$work/root/usr/share/sword" root/usr/bin/mod2imp engKJV2006eb > kjv.imp

python3 - kjv.imp "$books" "$out" <<'PY'
import re, sys
imp, wanted, out = sys.argv[1], sys.argv[2].split(","), sys.argv[3]
# mod2imp writes "$$$Book C:V" followed by the verse's OSIS text; C:0 and V:0 are headings.
verses = {}
key = None
with open(imp, encoding="utf-8") as f:
    for line in f:
        line = line.rstrip("\n")
        if line.startswith("$$$"):
            m = re.match(r"^\$\$\$(.+) (\d+):(\d+)$", line)
            key = (m.group(1), int(m.group(2)), int(m.group(3))) if m else None
            continue
        if key is None or key[1] == 0 or key[2] == 0:
            continue
        t = re.sub(r"<note\b.*?</note>", " ", line)
        t = re.sub(r"<title\b.*?</title>", " ", t)
        t = re.sub(r"<[^>]*>", "", t)
        t = re.sub(r"\\\+?[a-z]+\*?", "", t)
        for ent, ch in (("&lt;", "<"), ("&gt;", ">"), ("&quot;", '"'), ("&apos;", "'"), ("&amp;", "&")):
            t = t.replace(ent, ch)
        t = t.replace("\u00b6", " ").replace("\u2019", "'")
        t = re.sub(r"\s+", " ", t).strip()
        if t:
            verses.setdefault(key[0], []).append((key[1], t))
lines = []
for book in wanted:
    if book not in verses:
        sys.exit(f"make_demo_text: book {book!r} not in the module; known: {', '.join(verses)}")
    lines += [book.upper(), ""]
    last = None
    for chapter, text in verses[book]:
        if last is not None and chapter != last:
            lines.append("")
        last = chapter
        lines.append(text)
    lines.append("")
text = "\n".join(lines).rstrip("\n") + "\n"
with open(out, "w", encoding="utf-8") as f:
    f.write(text)
print(f"wrote {out}: {len(text.encode())} bytes, {len(set(text))} distinct characters")
PY
