"""A seconds-long version of ``make soak``, so its code runs in every test run.

It starts the real local stack, measures capacity briefly, sends paced load
for 5 s and restarts Redis midway, with each load generator: the Python one
always, wrk where it is on PATH (make test does not need wrk).
"""

from __future__ import annotations

import pytest

from hasp_authz.dev.loadgen import wrk_available
from hasp_authz.dev.soak import SoakConfig, run_soak
from hasp_authz.dev.soak_report import render_report

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("generator", ["python", "wrk"])
def test_soak_smoke_survives_redis_restart(tmp_path, generator):
    if generator == "wrk" and not wrk_available():
        pytest.skip("wrk is not on PATH (apt-get install wrk); make test needs none")
    config = SoakConfig(
        seconds=5,
        capacity_seconds=2,
        connections=8,
        threads=1,
        keys=3,
        generator=generator,
        workdir=tmp_path / "soak",
    )

    result = run_soak(config)

    run = result.run
    assert run.generator == generator
    assert result.capacity.rate > 0
    assert run.statuses["200"] > 0
    assert set(run.statuses) <= {"200", "503"}
    assert set(run.codes) <= {"AUTH_UNAVAILABLE"}
    assert sum(run.socket_errors.values()) == 0
    assert result.restart_at_seconds > 0
    assert result.recovery_seconds is not None
    assert result.recovery_seconds < 5
    assert set(result.rss_kib) == {"start", "middle", "end"}
    assert min(result.rss_kib.values()) > 0
    report = render_report(result, command="pytest")
    assert "Unexpected replies: none" in report
