"""The gate table in CI: clean ports pass on random and trained-like weights (massive
activations, attention sinks) for prompts of 1–641 tokens with and without BOS, and every fault
of tests/faults.py fails in exactly the blocks it was put in (docs/verification.md,
"Calibration")."""

import pytest
from faults import CODE_FAULTS, WEIGHT_FAULTS
from gate_cases import CONFIGS, SEEDS, Case, cases, prompts, run_case, write_source

pytestmark = pytest.mark.slow  # minutes: `make test-fast` leaves it out

CASES = cases()


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """Every case's report, computed lazily once (cases share compilations)."""
    work = tmp_path_factory.mktemp("gates")
    sources, reports, prompt_list = {}, {}, prompts()

    def report(case: Case):
        if case not in reports:
            key = (case.config, case.seed)
            if key not in sources:
                sources[key] = write_source(*key, work / f"clean-{case.config}-{case.seed}")
            reports[case] = run_case(case, sources[key], work / "run", prompt_list)
        return reports[case]

    return report


def test_the_prompts_span_one_to_hundreds_of_tokens_with_and_without_bos():
    lengths = [len(p.tokens) for p in prompts()]
    assert min(lengths) == 1 and max(lengths) > 600
    assert {p.bos for p in prompts()} == {True, False}
    assert "chat" in {p.kind for p in prompts()}


@pytest.mark.parametrize("case", [c for c in CASES if c.fault is None], ids=lambda c: c.id)
def test_a_correct_port_passes(table, case):
    report = table(case)
    assert report.verdict == "pass", report.reasons
    assert all(p.verdict == "pass" for p in report.prompts)


@pytest.mark.parametrize("case", [c for c in CASES if c.fault], ids=lambda c: c.id)
def test_a_fault_fails_in_exactly_its_blocks(table, case):
    report = table(case)
    faulty = CONFIGS[case.config].faulty_blocks
    assert report.verdict == "fail"
    assert report.failing_blocks == faulty, report.reasons[:6]
    assert report.first_failing_layer == faulty[0]
    for layer in report.layers:
        assert bool(layer.failures) == (layer.index in faulty), layer.failures


def test_the_table_covers_every_fault_and_clean_seed_whole_and_streamed():
    for stream in (True, False):
        mode = [c for c in CASES if c.stream == stream and c.dtype == "bfloat16"]
        faults = {(c.config, c.fault) for c in mode if c.fault}
        assert {f for c, f in faults if c in ("random", "trained-like")} == {
            *WEIGHT_FAULTS,
            *CODE_FAULTS,
        }
        assert {c for c, _ in faults} == set(CONFIGS)
        clean = {(c.config, c.seed) for c in mode if c.fault is None}
        assert clean == {(c, s) for c in CONFIGS for s in SEEDS}
