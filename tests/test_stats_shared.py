"""Live views (the progress stream) share one count per campaign in a process, reused for a
multiple of what it cost: a million-message campaign is not counted again every second for
every viewer (``campaigns.stats.shared_campaign_stats``)."""

from __future__ import annotations

import threading

import pytest

from campaigns import stats


@pytest.fixture
def counted(monkeypatch):
    """campaign_stats replaced by a count that costs 0.8 s of a controlled clock and can be held."""
    now = [100.0]
    calls = []
    release = threading.Event()
    release.set()

    def fake(session, campaign_id):
        assert release.wait(10)
        calls.append(campaign_id)
        now[0] += 0.8
        return {"sent": len(calls)}, {7: {"sent": len(calls)}}

    monkeypatch.setattr(stats, "clock", lambda: now[0])
    monkeypatch.setattr(stats, "campaign_stats", fake)
    monkeypatch.setattr(stats, "_shared", {})
    return now, calls, release


def test_viewers_asking_at_once_share_one_count(counted):
    now, calls, release = counted
    release.clear()
    results = []
    threads = [threading.Thread(target=lambda: results.append(stats.shared_campaign_stats(None, 1)))
               for _ in range(6)]
    for t in threads:
        t.start()
    release.set()
    for t in threads:
        t.join()
    assert calls == [1] and len(results) == 6
    assert all(r == ({"sent": 1}, {7: {"sent": 1}}) for r in results)


def test_a_count_is_reused_for_five_times_its_cost_then_made_again(counted):
    now, calls, _ = counted
    first = stats.shared_campaign_stats(None, 1, max_age=1.0)
    first[0]["sent"] = 999  # the caller's own copy: the shared one is untouched
    now[0] += 3.9  # the count cost 0.8 s: kept for 4 s, although the viewer asks every second
    assert stats.shared_campaign_stats(None, 1, max_age=1.0) == ({"sent": 1}, {7: {"sent": 1}})
    now[0] += 0.2
    assert stats.shared_campaign_stats(None, 1, max_age=1.0)[0] == {"sent": 2}
    assert stats.shared_campaign_stats(None, 1, fresh=True)[0] == {"sent": 3}  # a finished campaign's last figures
    assert stats.shared_campaign_stats(None, 2)[0] == {"sent": 4}  # another campaign has its own
    assert calls == [1, 1, 1, 2]


def test_a_cheap_count_follows_the_viewers_interval(counted, monkeypatch):
    now, calls, _ = counted
    monkeypatch.setattr(stats, "REUSE_FACTOR", 0.0)  # as for a small campaign: its cost is negligible
    stats.shared_campaign_stats(None, 1, max_age=1.0)
    now[0] += 0.5
    stats.shared_campaign_stats(None, 1, max_age=1.0)
    assert len(calls) == 1  # another viewer half a second later: the same count
    now[0] += 0.6
    stats.shared_campaign_stats(None, 1, max_age=1.0)
    assert len(calls) == 2
