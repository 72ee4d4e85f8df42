"""Code execution reward: run the completion's Python code against test cases in the sandbox.

Test cases come from the `test_cases` column (a list, or its JSON string), one entry per case:
  {"input": "<stdin>", "output": "<expected stdout>"}   compared line by line, trailing whitespace ignored
  {"assert": "assert f(2) == 4"} or a plain string       appended to the program; passes when it exits 0
Every case runs in its own sandboxed process (see `gspo_rewards.sandbox`), a bounded pool runs them in parallel.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from gspo.rewards import completion_text, register_reward

from .sandbox import ISOLATION_FAILED, Limits, SandboxUnavailable, default_hide, run_program

_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """The last fenced code block of a completion (```python ... ``` or ``` ... ```), None if there is none.

    >>> extract_code("Here:\\n```python\\nprint(1)\\n```\\nand better:\\n```python\\nprint(2)\\n```")
    'print(2)\\n'
    >>> extract_code("print(1)") is None
    True
    """
    blocks = _BLOCK.findall(text)
    return blocks[-1] if blocks else None


def _normalize(out: str) -> list[str]:
    return [line.rstrip() for line in out.strip().splitlines()]


def _case_job(code: str, case: Any) -> tuple[str, str, str | None]:
    """(program, stdin, expected stdout or None for assert-style cases)."""
    if isinstance(case, str):
        return code + "\n\n" + case + "\n", "", None
    if isinstance(case, dict) and "assert" in case:
        return code + "\n\n" + str(case["assert"]) + "\n", "", None
    if isinstance(case, dict) and "output" in case:
        return code, str(case.get("input", "")), str(case["output"])
    raise ValueError(f"test case {case!r}: expected {{'input','output'}}, {{'assert'}} or an assert string")


_probe: dict[str, str | None] = {}  # "reason" -> None when isolation works, else why not


def check_isolation(allow_unisolated: bool = False) -> bool:
    """Probe the sandbox once; True when isolation works. Raises SandboxUnavailable (fail closed) when it
    does not, unless `allow_unisolated` (then False: programs run with rlimits only)."""
    if "reason" not in _probe:
        result = run_program("print(6 * 7)", limits=Limits(cpu_s=2, wall_s=10))
        ok = result.status == "ok" and result.stdout.strip() == "42"
        _probe["reason"] = None if ok else (result.detail or result.stderr or result.status)
    reason = _probe["reason"]
    if reason is None:
        return True
    if allow_unisolated:
        if "warned" not in _probe:
            _probe["warned"] = "yes"
            logging.getLogger("gspo").warning(
                "code_execution: running programs WITHOUT isolation (kwargs allow_unisolated: true; %s): they "
                "can read your files and use the network; only rlimits, an empty environment and a temporary "
                "directory apply", reason)
        return False
    if not allow_unisolated:
        raise SandboxUnavailable(
            f"code_execution refuses to run: the sandbox cannot isolate programs ({reason}). It needs root "
            "(namespaces, an unprivileged uid). To run WITHOUT network/filesystem isolation anyway, set "
            "kwargs: {allow_unisolated: true} for this reward."
        )
    return False


def _check(kwargs: dict[str, Any]) -> None:
    check_isolation(bool(kwargs.get("allow_unisolated", False)))


@register_reward("code_execution")
def code_execution(
    prompts,
    completions,
    completion_ids=None,
    *,
    test_cases_column: str = "test_cases",
    partial_credit: bool = False,
    cpu_s: int = 2,
    wall_s: float = 5.0,
    memory_mb: int = 256,
    max_workers: int | None = None,
    allow_unisolated: bool = False,
    hide_paths: list[str] | None = None,
    **columns,
) -> list[float | None]:
    """Fraction of test cases passed (`partial_credit`) or 1.0 only when all pass; 0.0 without a code block;
    None (abstain) when the sample has no test cases. Limits per test case: `cpu_s`, `wall_s`, `memory_mb`;
    `hide_paths` are covered inside the sandbox besides the trainer's working directory and home.

    >>> code = "```python\\nprint(int(input()) * 2)\\n```"
    >>> code_execution(["double it"] * 2, [code, "no code"],
    ...                test_cases=[[{"input": "3", "output": "6"}]] * 2)  # doctest: +SKIP
    [1.0, 0.0]
    """
    isolated = check_isolation(allow_unisolated)
    hide = default_hide() + list(hide_paths or [])  # the trainer's cwd and home, plus any extra paths
    limits = Limits(cpu_s=cpu_s, wall_s=wall_s, memory_mb=memory_mb)
    cases_per_sample = columns[test_cases_column]
    jobs: list[tuple[int, str, str, str | None]] = []
    scores: list[float | None] = []
    for i, (completion, cases) in enumerate(zip(completions, cases_per_sample)):
        if isinstance(cases, str):
            cases = json.loads(cases)
        code = extract_code(completion_text(completion))
        if not cases:
            scores.append(None)
        elif code is None:
            scores.append(0.0)
        else:
            scores.append(0.0)
            jobs.extend((i, *_case_job(code, case)) for case in cases)
    total = [0] * len(scores)
    passed = [0] * len(scores)

    def run(job: tuple[int, str, str, str | None]) -> tuple[int, bool]:
        i, program, stdin, expected = job
        result = run_program(program, stdin, limits=limits, isolate=isolated, hide=hide)
        if result.status == ISOLATION_FAILED:
            raise SandboxUnavailable(f"code_execution: isolation failed mid-run: {result.detail}")
        ok = result.status == "ok" and result.returncode == 0
        if expected is not None:
            ok = ok and _normalize(result.stdout) == _normalize(expected)
        return i, ok

    workers = max_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, ok in pool.map(run, jobs):
            total[i] += 1
            passed[i] += int(ok)
    for i, score in enumerate(scores):
        if score is not None and total[i]:
            scores[i] = passed[i] / total[i] if partial_credit else float(passed[i] == total[i])
    return scores


code_execution.__reward_columns__ = lambda kwargs: [kwargs.get("test_cases_column", "test_cases")]
code_execution.__reward_check__ = _check
