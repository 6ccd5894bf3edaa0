"""Detokenizers: undo the word-level tokenisation some benchmark corpora ship with.

WikiText, PTB, LM1B and the scientific-papers corpora store text with spaces around
punctuation ("it 's", "1 @,@ 000"). A BPE model trained on natural web text (GPT-2, OWT)
sees such text as unusual and scores it worse, so zero-shot perplexities are computed on
detokenized text, as MDLM and SEDD do. The rules reproduce their effect so numbers stay
comparable. Each detokenizer is a pure str -> str function built from an ordered rule table.
"""

import re

Rule = tuple[str, str]


def _rules(*pairs: Rule) -> list[tuple[re.Pattern, str]]:
    return [(re.compile(pattern), repl) for pattern, repl in pairs]


def _apply(rules: list[tuple[re.Pattern, str]], text: str) -> str:
    for pattern, repl in rules:
        text = pattern.sub(repl, text)
    return text


_WIKITEXT = _rules(
    # Plural possessives: "dogs ' bones" -> "dogs' bones".
    (r"s '", "s'"),
    # Number separators are escaped with @: "1 @,@ 000" -> "1,000", "2 @.@ 5" -> "2.5".
    (r" @-@ ", "-"),
    (r" @,@ ", ","),
    (r" @\.@ ", "."),
    # Punctuation is split off on both sides. One rule per mark, in this order: a single
    # alternation would treat runs like " . , " differently from the reference detokenizer.
    (r" : ", ": "),
    (r" ; ", "; "),
    (r" \. ", ". "),
    (r" ! ", "! "),
    (r" \? ", "? "),
    (r" , ", ", "),
    # Brackets and quotes hold their content with inner spaces: "( a b )" -> "(a b)".
    (r"\(\s*([^)]*?)\s*\)", r"(\1)"),
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
    (r"\{\s*([^}]*?)\s*\}", r"{\1}"),
    (r'"\s*([^"]*?)\s*"', r'"\1"'),
    (r"'\s*([^']*?)\s*'", r"'\1'"),
    # Section headings: "= = Early life = =" -> "== Early life ==".
    (r"= = = =", "===="),
    (r"= = =", "==="),
    (r"= =", "=="),
    (" \u00b0 ", "\u00b0"),  # degree sign
    (r" \n", "\n"),
    (r"\n ", "\n"),
    (r" N ", " 1 "),
    (r" 's", "'s"),
)

_PTB = _rules(
    (r" 's", "'s"),
    (r"s ' ", "s' "),
    (r" n't", "n't"),
    (r" \n ", "\n"),
    (r"\\/", "/"),
    # PTB replaces numbers by N and rare words by <unk>; map them to plausible text.
    (r"(?<= )N(?= )", "1"),
    (r"\$ 1", "$1"),
    (r"# 1", "#1"),
    (r"<unk>", "?"),
)

_LM1B = _rules(
    (r"http : / / ", "http://"),
    (r"https : / / ", "https://"),
    (r" '(\w+)", r"'\1"),
    (r" (\w+) \. ", r" \1. "),
    (r" (\w+) \.$", r" \1."),
    (r" \? ", "? "),
    (r" \?$", "?"),
    (r" ! ", "! "),
    (r" !$", "!"),
    (r" , ", ", "),
    (r" : ", ": "),
    (r" ; ", "; "),
    (r" / ", "/"),
    (r'" ([^"]+) "', r'"\1"'),
    (r"' ([^']+) '", r"'\1'"),
    (r"\( ([^()]+) \)", r"(\1)"),
    (r"\[ ([^\[\]]+) \]", r"[\1]"),
    (r"\$ ", "$"),
    (r"\u00a3 ", "\u00a3"),  # pound sign
)


def wikitext(text: str) -> str:
    return _apply(_WIKITEXT, text)


def ptb(text: str) -> str:
    return _apply(_PTB, text)


def lm1b(text: str) -> str:
    return _apply(_LM1B, text)


def lambada(text: str) -> str:
    # Curly quotes become straight ones; the leading newline matches MDLM's protocol so
    # zero-shot LAMBADA numbers stay comparable with the published ones.
    text = text.replace("\u201c", '"').replace("\u201d", '"')
    return "\n" + text.strip()


def scientific_papers(text: str) -> str:
    # arXiv / PubMed articles mix both styles of tokenisation.
    return lm1b(wikitext(text))
