#!/usr/bin/env python3
"""docs/walkthrough.md names code as `path:function` (e.g.
`train/trainer.cpp:Trainer::train_epochs`); this keeps those names current.

Fails, naming the reference and its line, when
  * the file of a `path:function` reference does not exist, or the function
    is not DEFINED in it: `Class::method` must appear as `Class::method(` (or
    `Class<...>::method(`) at the start of a line, or as `method(` inside the
    body of `class Class` / `struct Class` in that file; a free `function`
    as `function(` at the start of a line (after its return type). Either way
    the parameter list must be followed by a body `{` before any `;`, so a
    declaration or a call does not count. Comments and string literals are
    ignored;
  * a file named on its own in a code span (`quant/grid.h`) does not exist;
  * a relative markdown link does not resolve: its file is missing, or its
    #anchor is not a heading of that file (GitHub's heading ids).

  python3 tests/walkthrough_references.py SOURCE_DIR [DOCUMENT]
"""
import os
import re
import sys

CODE_EXTENSIONS = r"(?:cpp|h)"
NAME = r"(?:[A-Za-z_]\w*::)*(?:operator\(\)|[A-Za-z_]\w*)"
# path:function, the path relative to the repository, not part of a longer word or path.
REFERENCE = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)+[\w.-]+\." + CODE_EXTENSIONS + r"):(" + NAME + r")(?![\w:])")
# A file alone in a code span: `quant/grid.h`, `docs/quantizers.md`.
FILE_SPAN = re.compile(r"`((?:[\w.-]+/)+[\w.-]+\.(?:cpp|h|md|sh|py|txt|json))`")
LINK = re.compile(r"(?<!!)\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def strip_comments_and_strings(text):
    """The C++ text with comments and string / character literals blanked
    (newlines kept, so offsets and line numbers stay)."""
    out = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        two = text[i:i + 2]
        if two == "//":
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif two == "/*":
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == "R" and text.startswith('R"', i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            m = re.match(r'R"([^(\s]*)\(', text[i:])
            if not m:
                out.append(c)
                i += 1
                continue
            end = text.find(")" + m.group(1) + '"', i + m.end())
            j = n if end < 0 else end + len(m.group(1)) + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        elif c == '"' or (c == "'" and (i == 0 or not text[i - 1].isalnum())):
            j = i + 1
            while j < n and text[j] != c and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            j = min(j + 1, n)
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def matching(code, i, open_ch, close_ch):
    """Index just past the bracket that closes the one at code[i]."""
    depth = 0
    for j in range(i, len(code)):
        if code[j] == open_ch:
            depth += 1
        elif code[j] == close_ch:
            depth -= 1
            if depth == 0:
                return j + 1
    return len(code)


def has_body(code, paren):
    """Whether the parameter list opening at code[paren] is followed by a
    function body ('{' before any ';'): a definition, not a declaration or a call."""
    j = matching(code, paren, "(", ")")
    for k in range(j, len(code)):
        if code[k] == "{":
            return True
        if code[k] == ";":
            return False
    return False


def defined_at_line_start(code, qualified):
    """A definition of `qualified` (e.g. "Trainer::run", "conv2d") whose line
    starts at column 0 with its return type (or with the name itself)."""
    pattern = re.compile(r"(?m)^(?![ \t])[^;{}()\n]*?(?<![\w.>:~])" + qualified + r"\s*\(")
    return any(has_body(code, m.end() - 1) for m in pattern.finditer(code))


def defined_in_class(code, cls, method):
    """A definition of `method` inside the body of class or struct `cls`."""
    for m in re.finditer(r"\b(?:class|struct)\s+" + re.escape(cls) + r"\b[^;{}()]*\{", code):
        body_start = m.end() - 1
        body = code[body_start:matching(code, body_start, "{", "}")]
        pattern = re.compile(r"(?m)^[ \t]*[^;{}()=\n]*?(?<![\w.>:~])" + re.escape(method) + r"\s*\(")
        if any(has_body(body, d.end() - 1) for d in pattern.finditer(body)):
            return True
    return False


def is_defined(code, name):
    if "::" in name:
        cls, method = name.rsplit("::", 1)
        if "::" in cls:  # Outer::Inner::method: the innermost class is the one to find
            cls = cls.rsplit("::", 1)[1]
        qualified = re.escape(cls) + r"(?:<[^<>;{}()]*>)?::" + re.escape(method)
        return defined_at_line_start(code, qualified) or defined_in_class(code, cls, method)
    return defined_at_line_start(code, re.escape(name))


def github_slug(heading, seen):
    """GitHub's id of a heading: the text lower-cased, punctuation dropped,
    spaces made dashes; repeats get -1, -2, ..."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    slug = re.sub(r"[^\w\- ]", "", text).replace(" ", "-")
    count = seen.get(slug, 0)
    seen[slug] = count + 1
    return slug if count == 0 else f"{slug}-{count}"


def heading_ids(markdown):
    ids, seen, fenced = set(), {}, False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            ids.add(github_slug(m.group(1), seen))
    return ids


def line_of(text, offset):
    return text.count("\n", 0, offset) + 1


def main():
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    root = sys.argv[1]
    doc_rel = sys.argv[2] if len(sys.argv) == 3 else "docs/walkthrough.md"
    doc_path = os.path.join(root, doc_rel)
    with open(doc_path, encoding="utf-8") as f:
        doc = f.read()

    failures = []
    code_cache = {}

    references = [(m.group(1), m.group(2), line_of(doc, m.start())) for m in REFERENCE.finditer(doc)]
    for path, name, line in references:
        where = f"{doc_rel}:{line}: `{path}:{name}`"
        full = os.path.join(root, path)
        if not os.path.isfile(full):
            failures.append(f"{where}: no file {path}")
            continue
        if path not in code_cache:
            with open(full, encoding="utf-8", errors="replace") as f:
                code_cache[path] = strip_comments_and_strings(f.read())
        if not is_defined(code_cache[path], name):
            failures.append(f"{where}: {path} defines no {name}(...)")

    files = [(m.group(1), line_of(doc, m.start())) for m in FILE_SPAN.finditer(doc)]
    for path, line in files:
        if not os.path.exists(os.path.join(root, path)):
            failures.append(f"{doc_rel}:{line}: `{path}`: no such file")

    links = 0
    doc_dir = os.path.dirname(doc_path)
    for m in LINK.finditer(doc):
        target = m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        links += 1
        where = f"{doc_rel}:{line_of(doc, m.start())}: link ({target})"
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(doc_dir, file_part)) if file_part else doc_path
        if not os.path.exists(linked):
            failures.append(f"{where}: no file {os.path.relpath(linked, root)}")
            continue
        if anchor:
            if not linked.endswith(".md"):
                failures.append(f"{where}: an anchor into a file that is not markdown")
                continue
            with open(linked, encoding="utf-8") as f:
                if anchor not in heading_ids(f.read()):
                    failures.append(f"{where}: {os.path.relpath(linked, root)} has no heading #{anchor}")

    if not references:
        failures.append(f"{doc_rel}: no `path:function` reference found (the check would prove nothing)")
    if failures:
        print(f"{doc_rel} names code or files that do not exist:")
        for f in failures:
            print("  " + f)
        sys.exit(1)
    distinct = len({(p, n) for p, n, _ in references})
    print(f"{doc_rel}: {len(references)} `path:function` references ({distinct} distinct) are definitions, "
          f"{len(files)} file names exist, {links} relative links resolve")


if __name__ == "__main__":
    main()
