"""Queueing and a too-small batch named from what the engine reports now, before the requests that waited end.

An arrival burst grows the engine's running batch at once, but its queue forms only when the batch reaches
max_num_seqs, and a request's queue time is known only when it ends: in the simulated fleet the right cause
used to be named 80-130 s after the onset. These hold the candidates that name it from the leading signals
(more arrivals with a batch well above the baseline's; the engine's waiting gauge) to what may, and may not,
trigger them."""

from __future__ import annotations

from correlator.analysis.attribution import Candidate, UnitLatency, score, unit_candidates
from correlator.analysis.evidence import Evidence, Stat
from correlator.analysis.requests import Unit
from correlator.analysis.why import _MIN_SCORE

KEY = "node-2/pid4101"
MIN_CONFIRMED = 0.5  # the online detector's MIN_SCORE


def _latency(arrival_ratio: float = 1.0, ttft: float = 1.15, tpot: float = 1.12, queue_inc_s: float = 0.0,
             arrival_step: tuple[float, float, int] | None = None) -> dict[str, UnitLatency]:
    unit = Unit(KEY, 2, "node-2", 4101, (5, 6), "explicit")
    return {KEY: UnitLatency(unit, n_base=9000, n_inc=150, ttft_ratio=ttft, tpot_ratio=tpot, queue_base_s=0.0,
                             queue_inc_s=queue_inc_s, prefill_ratio=1.0, arrival_ratio=arrival_ratio,
                             tokens_ratio=1.0, excess_share=1.0, arrival_step=arrival_step)}


def _evidence(running: tuple[float, float, float, float] = (26.0, 34.0, 46.0, 54.0),
              waiting: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0), kv_high: float = 0.6) -> Evidence:
    """Engine gauges of the replica: (baseline median, baseline p95, incident median, incident p95)."""
    def stat(v: tuple[float, float, float, float]) -> Stat:
        return Stat(base_median=v[0], base_mad=1.0, inc_median=v[2], inc_high=v[3], base_high=v[1])

    ev = Evidence()
    ev.engine[(2, 4101)] = {"engine_requests_running": stat(running), "engine_requests_waiting": stat(waiting),
                            "engine_kv_cache_usage_ratio": stat((0.5, kv_high - 0.05, kv_high - 0.05, kv_high))}
    return ev


def _scheduling(cands: list[Candidate]) -> list[Candidate]:
    return [c for c in cands if c.cause == "scheduling"]


def test_more_arrivals_and_a_batch_above_the_baseline_name_queueing_before_the_queue_forms() -> None:
    lat = _latency(arrival_ratio=1.47)
    [c] = _scheduling(unit_candidates(_evidence(), lat))
    assert (c.subcause, c.node_id, c.gpu_id, c.pid) == ("queueing", 2, 5, 4101)
    assert "a queue is forming" in c.description and "46 running" in c.description
    s, share = score(c, lat)
    assert s >= MIN_CONFIRMED and share == 1.0
    # the latency it makes must show: a replica whose TTFT and TPOT have not moved is not blamed
    s_flat, _ = score(c, _latency(arrival_ratio=1.47, ttft=1.0, tpot=1.0))
    assert s_flat < MIN_CONFIRMED


def test_a_batch_that_grew_without_more_arrivals_is_not_queueing() -> None:
    """A slower GPU grows the running batch too (each request stays longer), but the arrivals stay: not load."""
    assert not _scheduling(unit_candidates(_evidence(), _latency(arrival_ratio=1.05)))
    # nor more arrivals that the batch absorbs within what it ran in the baseline
    assert not _scheduling(unit_candidates(_evidence(running=(26.0, 34.0, 31.0, 36.0)), _latency(arrival_ratio=1.5)))
    # nor a full KV cache: that is memory pressure, and its own candidate says so
    cands = unit_candidates(_evidence(kv_high=0.99), _latency(arrival_ratio=1.5))
    assert not _scheduling(cands) and [c.subcause for c in cands] == ["kv_cache_pressure"]


def test_the_engines_waiting_gauge_names_queueing_before_queue_times_rise() -> None:
    lat = _latency(arrival_ratio=1.6, ttft=3.8)
    [c] = _scheduling(unit_candidates(_evidence(running=(26.0, 34.0, 60.0, 64.0), waiting=(0.0, 0.0, 2.0, 8.0)),
                                      lat))
    assert c.subcause == "queueing" and c.symptom == "ttft" and "up to 8 requests waiting" in c.description
    assert score(c, lat)[0] >= MIN_CONFIRMED
    # once the requests that waited have ended, their queue times are the symptom, as before
    lat_q = _latency(arrival_ratio=1.6, ttft=3.8, queue_inc_s=2.5)
    [c_q] = _scheduling(unit_candidates(_evidence(running=(26.0, 34.0, 60.0, 64.0)), lat_q))
    assert c_q.subcause == "queueing" and c_q.symptom == "queue" and "queue time p90" in c_q.description


def test_a_capped_batch_with_requests_waiting_is_batching_before_their_queue_times_show() -> None:
    capped = (26.0, 33.6, 22.9, 28.0)  # held at 28, below the 33.6 it reached in the baseline
    lat = _latency(arrival_ratio=0.9, ttft=3.8, tpot=0.96)
    [c] = _scheduling(unit_candidates(_evidence(running=capped, waiting=(0.0, 0.0, 0.0, 7.9)), lat))
    assert c.subcause == "batching" and c.symptom == "ttft"
    assert score(c, lat)[0] >= MIN_CONFIRMED
    # without anybody waiting (nor queue times), a batch below its old high is only a quieter replica
    assert not _scheduling(unit_candidates(_evidence(running=capped), lat))
    # one request waiting now and then in a baseline that had some too is no queue forming
    assert not _scheduling(unit_candidates(_evidence(running=capped, waiting=(0.0, 3.0, 0.0, 4.0)), lat))


def test_scores_stay_under_the_report_threshold_when_nothing_holds() -> None:
    """The candidates above need their evidence: a replica at its baseline yields no scheduling finding."""
    quiet = _evidence(running=(26.0, 34.0, 26.0, 33.0))
    assert not _scheduling(unit_candidates(quiet, _latency()))
    assert _MIN_SCORE < MIN_CONFIRMED
