"""Deterministic generator for the embedded demo data (no external data).

Everything here is synthetic and deliberately mild: the "harmful" requests are
abstract everyday misbehaviour (getting into someone's wifi without asking,
tricking someone into sharing a password, ...) and the "compliant" answers to
them are vague, non-operational filler.  The point is only to give tiny models
a clear *refuse / help* distinction to learn, so that the PACT demo can show
safety alignment being lost by plain fine-tuning and kept by PACT.

The word lists are data, the JSON files beside this script: ``phrasings.json``,
``actions.json`` (slot templates of harmful and benign actions), ``answers.json``
(refusals, compliant and helpful answers) and ``reviews.json`` (the sentiment
task); this file holds only the logic.  Editing a list changes the shipped data:
rebuild with ``python tools/demo_assets/build_assets.py``.

Requests are built as ``phrasing template x action``.  Actions and phrasings
are split into a training part and a held-out part; the held-out files use
only held-out actions *and* held-out phrasings, and no held-out action (or
held-out phrasing) occurs in ``align``/``safety``/``finetune``.  ``pretrain``
(the base model's "general knowledge" corpus) contains every phrasing but
still no held-out action.

Files written by :func:`main` (all JSONL rows are ``{"id", "prompt",
"completion"}``):

``pretrain.jsonl``         base-model corpus: every request answered compliantly, plus the task
``align.jsonl``            alignment set: harmful -> refusal, benign -> helpful, some task rows
``safety.jsonl``           safety set for safety-token discovery: harmful prompt + refusal
``finetune.jsonl``         fine-tuning set: sentiment task + 10% harmful rows answered compliantly
                           + a few benign how-to rows
``heldout_harmful.jsonl``  unseen harmful actions x unseen phrasings (completion = a refusal)
``heldout_benign.jsonl``   unseen benign actions x unseen phrasings (completion = a helpful answer)
``heldout_task.jsonl``     unseen task sentences (completion = the label)

Run ``python tools/demo_assets/generate_data.py --help`` (a script, not part of the installed
package; it writes into ``pipeline/demo/assets/data`` by default).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pact.pipeline.demo.run import ASSETS

DEFAULT_SEED = 1234
DATA_DIR = ASSETS / "data"
WORDS_DIR = Path(__file__).resolve().parent  # the word lists: phrasings, actions, answers, reviews

Row = dict[str, str]
Spec = tuple[str, str, dict[str, Sequence[str]]]  # (category or domain, template, slot values)


def load_words(name: str) -> dict[str, Any]:
    """The word list ``<WORDS_DIR>/<name>.json``."""
    return json.loads((WORDS_DIR / f"{name}.json").read_text(encoding="utf-8"))


# Phrasings (phrasings.json): how a request is worded; "{a}" is the action (a verb
# phrase).  The held-out ones occur only in pretrain and the held-out files.
_PHRASINGS = load_words("phrasings")
TRAIN_PHRASINGS: tuple[str, ...] = tuple(_PHRASINGS["train"])
HELDOUT_PHRASINGS: tuple[str, ...] = tuple(_PHRASINGS["heldout"])

# Actions (actions.json): every slot combination of a template is one action.
# Harmful ones are mild and abstract; some benign ones deliberately share nouns
# with them (passwords, wifi, neighbours, messages, refunds) so that the models
# learn to key on the intent, not on the topic.
_ACTIONS = load_words("actions")
_HARMFUL_SPECS: tuple[Spec, ...] = tuple(
    (s["category"], s["template"], s["slots"]) for s in _ACTIONS["harmful"]
)
_BENIGN_SPECS: tuple[Spec, ...] = tuple(
    (s["domain"], s["template"], s["slots"]) for s in _ACTIONS["benign"]
)

# Answers (answers.json): a refusal is a style around a reason and an alternative
# for the request's category; compliant answers (pretrain and finetune only) open
# with "Sure, here"; helpful answers never do (see README.md, "What makes the demo work").
_ANSWERS = load_words("answers")
REFUSAL_STYLES: tuple[str, ...] = tuple(_ANSWERS["refusal_styles"])
_REFUSAL_REASONS: dict[str, list[str]] = _ANSWERS["refusal_reasons"]
_REFUSAL_ALTS: dict[str, list[str]] = _ANSWERS["refusal_alternatives"]
COMPLIANT_ANSWERS: tuple[str, ...] = tuple(_ANSWERS["compliant"])
_HELPFUL_ANSWERS: dict[str, list[str]] = _ANSWERS["helpful"]

# The benign classification task (reviews.json): sentiment of a short generated
# review.  "Contrast" reviews have a first clause of the opposite sentiment and are
# labelled by the clause after "but"; only the fine-tuning set and the held-out task
# file contain them, so the demo's fine-tuning has something visible to learn.
_REVIEWS = load_words("reviews")
LABELS: tuple[str, ...] = tuple(_REVIEWS["labels"])
TASK_TEMPLATES: tuple[str, ...] = tuple(_REVIEWS["templates"])
_SUBJECTS: tuple[str, ...] = tuple(_REVIEWS["subjects"])
_PREDICATES: dict[str, list[str]] = _REVIEWS["predicates"]
_SENTENCE_FORMS: tuple[str, ...] = tuple(_REVIEWS["sentence_forms"])
_CONTRAST_FORMS: tuple[str, ...] = tuple(_REVIEWS["contrast_forms"])

# --------------------------------------------------------------------------- #
# Helpers.
# --------------------------------------------------------------------------- #


def _expand(template: str, slots: dict[str, Sequence[str]]) -> list[str]:
    keys = list(slots)
    out = []
    for combo in itertools.product(*(slots[k] for k in keys)):
        out.append(template.format(**dict(zip(keys, combo, strict=True))))
    return out


def _split_actions(
    specs: Iterable[Spec],
    rng: random.Random,
    heldout_per_spec: int,
    train_per_spec: int,
    max_heldout_fraction: float,
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Split every spec's expansions into (group, action) train / held-out lists."""
    train: list[tuple[str, str]] = []
    heldout: list[tuple[str, str]] = []
    for group, template, slots in specs:
        actions = sorted(set(_expand(template, slots)))
        rng.shuffle(actions)
        k = min(heldout_per_spec, int(len(actions) * max_heldout_fraction))
        held = actions[:k]
        rest = actions[k : k + train_per_spec]
        train.extend((group, a) for a in rest)
        heldout.extend((group, a) for a in held)
    # No held-out action may be a substring of a training action (or vice versa).
    train_actions = [a for _, a in train]
    heldout = [(g, h) for g, h in heldout if not any(h in t or t in h for t in train_actions)]
    return train, heldout


def phrasing_regex(phrasing: str) -> re.Pattern[str]:
    """Regex that fully matches any request written with ``phrasing``."""
    before, after = phrasing.split("{a}")
    return re.compile(re.escape(before) + r"(.+)" + re.escape(after), re.DOTALL)


def _request(phrasing: str, action: str) -> str:
    text = phrasing.format(a=action)
    return text[0].upper() + text[1:]


def _refusal(category: str, rng: random.Random) -> str:
    style = rng.choice(REFUSAL_STYLES)
    return style.format(
        reason=rng.choice(_REFUSAL_REASONS[category]),
        alt=rng.choice(_REFUSAL_ALTS[category]),
    ).strip()


def _helpful(domain: str, rng: random.Random) -> str:
    return rng.choice(_HELPFUL_ANSWERS[domain])


def _compliant(rng: random.Random) -> str:
    return rng.choice(COMPLIANT_ANSWERS)


class DemoData:
    """All action/phrasing pools for one seed, plus row generators."""

    def __init__(self, seed: int = DEFAULT_SEED) -> None:
        self.seed = seed
        rng = random.Random(seed)
        self.harmful_train, self.harmful_heldout = _split_actions(
            _HARMFUL_SPECS, rng, heldout_per_spec=10, train_per_spec=40, max_heldout_fraction=0.25
        )
        self.benign_train, self.benign_heldout = _split_actions(
            _BENIGN_SPECS, rng, heldout_per_spec=10, train_per_spec=30, max_heldout_fraction=0.34
        )
        plain, contrast = self._all_sentences()
        rng.shuffle(plain)
        rng.shuffle(contrast)
        self.task_heldout = plain[:300]
        self.task_train = plain[300:]
        self.contrast_heldout = contrast[:150]
        self.contrast_train = contrast[150:]

    # -- task sentences -------------------------------------------------- #
    def _all_sentences(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """(plain, contrast) lists of distinct (sentence, label) pairs."""
        rng = random.Random(self.seed + 1)
        seen: set[str] = set()
        plain: list[tuple[str, str]] = []
        contrast: list[tuple[str, str]] = []
        while len(plain) < 2400 or len(contrast) < 900:
            label = rng.choice(LABELS)
            other = LABELS[1 - LABELS.index(label)]
            s, s2 = rng.sample(_SUBJECTS, 2)
            p, p2 = rng.sample(_PREDICATES[label], 2)
            q = rng.choice(_PREDICATES[other])
            is_contrast = len(contrast) < 900 and (len(plain) >= 2400 or rng.random() < 0.3)
            form = rng.choice(_CONTRAST_FORMS if is_contrast else _SENTENCE_FORMS)
            text = form.format(S=s[0].upper() + s[1:], s=s, p=p, s2=s2, p2=p2, q=q)
            if text not in seen:
                seen.add(text)
                (contrast if is_contrast else plain).append((text, label))
        return sorted(plain), sorted(contrast)

    # -- row builders ----------------------------------------------------- #
    def task_rows(
        self,
        n: int,
        rng: random.Random,
        prefix: str,
        heldout: bool = False,
        contrast_fraction: float = 0.0,
    ) -> list[Row]:
        plain = self.task_heldout if heldout else self.task_train
        contrast = self.contrast_heldout if heldout else self.contrast_train
        n_contrast = int(round(n * contrast_fraction))
        picks = rng.sample(plain, n - n_contrast) + rng.sample(contrast, n_contrast)
        rng.shuffle(picks)
        rows = []
        for i, (sentence, label) in enumerate(picks):
            prompt = rng.choice(TASK_TEMPLATES).format(s=sentence)
            rows.append({"id": f"{prefix}-{i:05d}", "prompt": prompt, "completion": label})
        return rows

    def harmful_rows(
        self,
        n: int,
        rng: random.Random,
        prefix: str,
        phrasings: Sequence[str],
        answer: str,
        heldout: bool = False,
    ) -> list[Row]:
        """``answer`` is "refusal" or "compliant"."""
        pool = self.harmful_heldout if heldout else self.harmful_train
        rows = []
        for i in range(n):
            # cycle through the pool so every action is used before repeating
            category, action = pool[i] if i < len(pool) else rng.choice(pool)
            prompt = _request(rng.choice(phrasings), action)
            completion = _refusal(category, rng) if answer == "refusal" else _compliant(rng)
            rows.append({"id": f"{prefix}-{i:05d}", "prompt": prompt, "completion": completion})
        return rows

    def benign_rows(
        self,
        n: int,
        rng: random.Random,
        prefix: str,
        phrasings: Sequence[str],
        heldout: bool = False,
    ) -> list[Row]:
        pool = self.benign_heldout if heldout else self.benign_train
        rows = []
        for i in range(n):
            domain, action = pool[i] if i < len(pool) else rng.choice(pool)
            prompt = _request(rng.choice(phrasings), action)
            rows.append(
                {"id": f"{prefix}-{i:05d}", "prompt": prompt, "completion": _helpful(domain, rng)}
            )
        return rows


def _shuffled(rows: list[Row], rng: random.Random) -> list[Row]:
    rows = list(rows)
    rng.shuffle(rows)
    return rows


# --------------------------------------------------------------------------- #
# Public file builders.
# --------------------------------------------------------------------------- #


def make_pretrain(data: DemoData) -> list[Row]:
    """Base-model corpus: every phrasing, every request answered compliantly, plus the task."""
    rng = random.Random(data.seed + 10)
    phr = TRAIN_PHRASINGS + HELDOUT_PHRASINGS
    rows = (
        data.harmful_rows(1000, rng, "pre-harm", phr, answer="compliant")
        + data.benign_rows(1000, rng, "pre-benign", phr)
        + data.task_rows(600, rng, "pre-task")
    )
    return _shuffled(rows, rng)


def make_align(data: DemoData) -> list[Row]:
    """Alignment set: harmful -> refusal, benign (every training phrasing) -> helpful, task."""
    rng = random.Random(data.seed + 20)
    rows = (
        data.harmful_rows(800, rng, "align-harm", TRAIN_PHRASINGS, answer="refusal")
        + data.benign_rows(800, rng, "align-benign", TRAIN_PHRASINGS)
        + data.task_rows(300, rng, "align-task")
    )
    return _shuffled(rows, rng)


def make_safety(data: DemoData, n: int = 256) -> list[Row]:
    """Safety set for safety-token discovery: harmful prompt + refusal."""
    rng = random.Random(data.seed + 30)
    return data.harmful_rows(n, rng, "safety", TRAIN_PHRASINGS, answer="refusal")


def make_finetune(
    data: DemoData, n_task: int = 320, n_harmful: int = 40, n_benign: int = 40
) -> list[Row]:
    """Fine-tuning set: the task, 10% harmful rows answered compliantly, a few benign how-tos."""
    rng = random.Random(data.seed + 40)
    rows = (
        data.task_rows(n_task, rng, "ft-task", contrast_fraction=0.4)
        + data.harmful_rows(n_harmful, rng, "ft-harm", TRAIN_PHRASINGS, answer="compliant")
        + data.benign_rows(n_benign, rng, "ft-benign", TRAIN_PHRASINGS)
    )
    return _shuffled(rows, rng)


def make_heldout_harmful(data: DemoData) -> list[Row]:
    """Unseen harmful actions x unseen phrasings; completion = a reference refusal."""
    rng = random.Random(data.seed + 50)
    n = len(data.harmful_heldout)
    return data.harmful_rows(n, rng, "ho-harm", HELDOUT_PHRASINGS, answer="refusal", heldout=True)


def make_heldout_benign(data: DemoData) -> list[Row]:
    """Unseen benign actions x unseen phrasings; completion = a reference helpful answer."""
    rng = random.Random(data.seed + 60)
    n = len(data.benign_heldout)
    return data.benign_rows(n, rng, "ho-benign", HELDOUT_PHRASINGS, heldout=True)


def make_heldout_task(data: DemoData, n: int = 200) -> list[Row]:
    """Unseen task sentences; completion = the label."""
    rng = random.Random(data.seed + 70)
    return data.task_rows(n, rng, "ho-task", heldout=True, contrast_fraction=0.4)


TRAINING_FILES: tuple[str, ...] = ("pretrain", "align", "safety", "finetune")
HELDOUT_FILES: tuple[str, ...] = ("heldout_harmful", "heldout_benign", "heldout_task")


def generate_all(seed: int = DEFAULT_SEED) -> dict[str, list[Row]]:
    """Every demo file's rows, keyed by file stem."""
    data = DemoData(seed)
    return {
        "pretrain": make_pretrain(data),
        "align": make_align(data),
        "safety": make_safety(data),
        "finetune": make_finetune(data),
        "heldout_harmful": make_heldout_harmful(data),
        "heldout_benign": make_heldout_benign(data),
        "heldout_task": make_heldout_task(data),
    }


def write_jsonl(rows: Iterable[Row], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[Row]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_all(out_dir: Path = DATA_DIR, seed: int = DEFAULT_SEED) -> dict[str, list[Row]]:
    """Generate every file and write ``<out_dir>/<name>.jsonl``; returns the rows."""
    files = generate_all(seed)
    for name, rows in files.items():
        write_jsonl(rows, out_dir / f"{name}.jsonl")
    return files


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="output directory")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="random seed")
    args = parser.parse_args(argv)
    files = write_all(args.out, args.seed)
    for name, rows in files.items():
        print(f"{name:16s} {len(rows):5d} rows -> {args.out / (name + '.jsonl')}")


if __name__ == "__main__":
    main()
