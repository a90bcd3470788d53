"""The step computes what it computed before a refactor: per-step losses of every case in
``tests/golden.py`` (one process and two gloo processes) and the SVM logits of each QP backend agree
with the values recorded in ``tests/data/golden.json`` (float32 summation order aside: 1e-6)."""

from __future__ import annotations

import json
from typing import Any

import pytest

import golden

TOL = 1e-6


@pytest.fixture(scope="module")
def recorded() -> dict[str, Any]:
    return json.loads(golden.GOLDEN.read_text())


def _compare(now: dict[str, list[float]], before: dict[str, list[float]]) -> None:
    assert sorted(now) == sorted(before)
    bad = {
        k: (before[k], now[k])
        for k in before
        if len(now[k]) != len(before[k]) or any(abs(a - b) > TOL for a, b in zip(now[k], before[k]))
    }
    assert not bad, bad


def test_one_process_losses_are_unchanged(recorded: dict[str, Any]) -> None:
    now = golden.one_process()
    _compare(now["one_process"], recorded["one_process"])
    _compare(now["svm_logits"], recorded["svm_logits"])


def test_two_process_losses_are_unchanged(recorded: dict[str, Any]) -> None:
    _compare(golden.two_processes(), recorded["two_processes"])
