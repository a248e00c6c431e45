"""Apply known mutations to a temporary copy of the project, one at a time, and report which the test suite misses.

A mutation is a small change that breaks a behaviour (an exact text replacement in one source file). For each, the
copy's tests run with `pytest -x` against the copy's own `src/` (so the installed package is never touched); a
mutation is *killed* when at least one test fails, and *survives* when the suite stays green. An unchanged copy runs
first: it must pass, or the report would mean nothing.

    python scripts/mutation_check.py                     # every mutation, the whole suite (minutes each)
    python scripts/mutation_check.py --only budget-stats --tests tests/test_selector.py
    python scripts/mutation_check.py --list

Exit code 0 when every mutation was killed, 1 when one survived, 2 on a usage error (an unknown name, a mutation
whose text is no longer in the source: update it together with the code).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SELECTOR = "src/qtsplus_hf/selector_qtsplus.py"
QWEN2_5_VL = "src/qtsplus_hf/modeling_qtsplus_qwen2_5_vl.py"
QWEN3_VL = "src/qtsplus_hf/modeling_qtsplus_qwen3_vl.py"


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the project root
    original: str  # must occur exactly once
    replacement: str
    breaks: str


MUTATIONS = (
    Mutation(
        "budget-stats", SELECTOR,
        "stats = torch.stack([num_tokens.log(), scores.amax(-1), entropy], dim=-1)",
        "stats = torch.zeros(len(scores), 3, device=scores.device)",
        "the budget head no longer sees log M, max r and the entropy of p",
    ),
    Mutation(
        "image-positions-as-text", QWEN2_5_VL,
        "        position_ids, _ = self.model.get_rope_index(\n            input_ids,\n"
        "            mm_token_type_ids=mm_token_type_ids,",
        "        position_ids, _ = self.model.get_rope_index(\n            input_ids,\n"
        "            mm_token_type_ids=mm_token_type_ids.masked_fill(mm_token_type_ids == 1, 0),",
        "image tokens get text positions in the compacted sequence",
    ),
    Mutation(
        "min-length-not-shifted", SELECTOR,
        'for name in ("max_length", "min_length"):',
        'for name in ("max_length",):',
        "min_length counts the compacted prompt instead of the caller's",
    ),
    Mutation(
        "prompt-of-the-wrong-row", SELECTOR,
        "prompt = input_ids.repeat_interleave(sequences.shape[0] // input_ids.shape[0], dim=0)",
        "prompt = input_ids.repeat(sequences.shape[0] // input_ids.shape[0], 1)",
        "under num_return_sequences each sequence starts with another row's prompt",
    ),
    Mutation(
        "positions-not-compacted", SELECTOR,
        "mrope_positions = compact(position_ids.permute(1, 2, 0), pad_value=0).permute(2, 0, 1)",
        "mrope_positions = text_positions[None].expand(3, -1, -1)",
        "kept video tokens lose their 3-D MRoPE positions",
    ),
    Mutation(
        "labels-steer-the-selection", SELECTOR,
        "        question = question & (labels == IGNORE_INDEX)",
        "        question = question",
        "the answer in the labels becomes part of the question",
    ),
    Mutation(
        "no-time-embedding", SELECTOR,
        "time_embeds = self.time_embedding(seconds) if self.time_embedding is not None else None",
        "time_embeds = None",
        "the re-encoder no longer injects absolute time",
    ),
    Mutation(
        "user-turn-rule-off", SELECTOR,
        "question = torch.where(has_user_turn[:, None], question & user_text, question)",
        "question = question",
        "without a query mask, the system prompt and role markers vote again",
    ),
    Mutation(
        "deepstack-not-injected", QWEN3_VL,
        "            return args, {**kwargs, **deepstack}",
        "            return args, kwargs",
        "Qwen3-VL's language model gets no DeepStack features for the compacted prefill",
    ),
    Mutation(
        "deepstack-rows-not-compacted", QWEN3_VL,
        "            torch.cat([video[rows.to(video.device)] for video, rows in zip(layer, kept_rows)])",
        "            torch.cat([video[: int(rows.sum())] for video, rows in zip(layer, kept_rows)])",
        "Qwen3-VL's DeepStack rows are the first n tokens' instead of the kept tokens'",
    ),
    Mutation(
        "timestamp-text-in-the-question", SELECTOR,
        "    return ((starts - ends > 0) & closed_later) | is_end",
        "    return (input_ids == vision_start_id) | is_end",
        "Qwen3-VL's timestamp text inside a video's span becomes part of the question",
    ),
)


def copy_project(destination: str) -> None:
    """The sources, tests and packaging files: what the suite needs (no virtual environments or build output)."""
    for name in ("src", "tests", "hub_card", "scripts"):
        shutil.copytree(os.path.join(ROOT, name), os.path.join(destination, name), symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(os.path.join(ROOT, name), destination)


def apply(mutation: Mutation, project: str) -> None:
    path = os.path.join(project, mutation.path)
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if text.count(mutation.original) != 1:
        raise ValueError(f"mutation {mutation.name}: its original text occurs {text.count(mutation.original)} times "
                         f"in {mutation.path} (expected once); update the mutation with the code")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text.replace(mutation.original, mutation.replacement))


def run_tests(project: str, tests: list[str]) -> tuple[bool, float, str]:
    """(passed, seconds, last line of pytest's output) for the copy's tests against the copy's sources."""
    env = dict(os.environ, PYTHONPATH=os.path.join(project, "src"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=project, env=env, capture_output=True, text=True,
    )
    lines = [line for line in result.stdout.strip().splitlines() if line.strip()]
    return result.returncode == 0, time.perf_counter() - start, lines[-1] if lines else result.stderr[-200:]


def check_imports_copy(project: str) -> None:
    """The copy's tests must import the copy's package, not the installed one."""
    env = dict(os.environ, PYTHONPATH=os.path.join(project, "src"))
    found = subprocess.run([sys.executable, "-c", "import qtsplus_hf; print(qtsplus_hf.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not found.startswith(project):
        raise RuntimeError(f"the copy imports qtsplus_hf from {found}, not from {project}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", default=None, help="names of the mutations to apply (default: all)")
    parser.add_argument("--tests", nargs="+", default=["tests"], help="pytest targets (default: the whole suite)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    by_name = {mutation.name: mutation for mutation in MUTATIONS}
    if args.list:
        for mutation in MUTATIONS:
            print(f"{mutation.name}: {mutation.breaks}")
        return 0
    unknown = sorted(set(args.only or []) - set(by_name))
    if unknown:
        print(f"mutation_check: error: unknown mutation(s) {unknown}; see --list", file=sys.stderr)
        return 2
    chosen = [by_name[name] for name in args.only] if args.only else list(MUTATIONS)

    with tempfile.TemporaryDirectory(prefix="qtsplus-mutation-") as scratch:
        baseline = os.path.join(scratch, "unchanged")
        copy_project(baseline)
        check_imports_copy(baseline)
        passed, seconds, summary = run_tests(baseline, args.tests)
        print(f"unchanged copy: {'passed' if passed else 'FAILED'} in {seconds:.0f} s ({summary})", flush=True)
        if not passed:
            return 2
        survivors = []
        for mutation in chosen:
            project = os.path.join(scratch, mutation.name)
            copy_project(project)
            try:
                apply(mutation, project)
            except ValueError as error:
                print(f"mutation_check: error: {error}", file=sys.stderr)
                return 2
            passed, seconds, summary = run_tests(project, args.tests)
            verdict = "SURVIVED" if passed else "killed"
            print(f"{mutation.name}: {verdict} in {seconds:.0f} s ({summary}) - {mutation.breaks}", flush=True)
            if passed:
                survivors.append(mutation.name)
            shutil.rmtree(project)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutations killed" +
          (f"; surviving: {', '.join(survivors)}" if survivors else ""))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
