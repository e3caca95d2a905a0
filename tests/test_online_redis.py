"""The online feature state on a real Redis: equal to the batch features, atomic and idempotent across workers."""
import socket
import threading
import time
from datetime import date, datetime, timedelta

import numpy as np
import polars as pl
import pytest

from conftest import ROOT
from mlpay.config import compose
from mlpay.features import FeatureSpec, compute_features
from mlpay.online import LateTransaction, OnlineFeatures, RedisStore
from mlpay.sequences import history_index, history_steps
from mlpay.simulate import simulate

D = date(2018, 8, 1)
DAY = pl.col("TX_DATETIME").dt.date()
SPEC = FeatureSpec.from_cfg(compose(conf_dir=ROOT / "conf").features)


@pytest.fixture(scope="module")
def tiny():
    tx = simulate(compose(["data=tiny"], conf_dir=ROOT / "conf").data, progress=False)
    return tx, compute_features(tx, SPEC), history_steps(tx, history_index(tx, 8))


def requests(tx):
    cols = ["TRANSACTION_ID", "TX_DATETIME", "CUSTOMER_ID", "TERMINAL_ID", "TX_AMOUNT", "TX_FRAUD"]
    return tx.sort("TX_DATETIME", "TRANSACTION_ID").select(*(pl.col(c).alias(c.lower()) for c in cols)).to_dicts()


def replay(workers, reqs, feedback=True):
    "Score the requests in order, round-robin over the workers, sending each label back at once."
    feats, steps = [], []
    for i, r in enumerate(reqs):
        f, s = workers[i % len(workers)].score(r)
        feats.append(f); steps.append(s)
        if feedback: workers[(i + 1) % len(workers)].feedback(r["transaction_id"], bool(r["tx_fraud"]))
    return np.stack(feats), np.stack(steps)


def batch_of(tiny, reqs):
    tx, feats, steps = tiny
    rows = np.searchsorted(tx["TRANSACTION_ID"].to_numpy(), [r["transaction_id"] for r in reqs])
    return feats.select(SPEC.names).to_numpy()[rows], steps[rows]


def req(id, when, card=1, terminal=7, amount=10.0):
    return dict(transaction_id=id, tx_datetime=datetime.fromisoformat(when), customer_id=card, terminal_id=terminal, tx_amount=amount)


def test_replay_through_two_workers_equals_batch(redis_url, tiny):
    tx = tiny[0]
    workers = [OnlineFeatures(SPEC, 8, RedisStore(redis_url)) for _ in range(2)]  # two processes' worth of clients, one state
    t0 = time.perf_counter()
    workers[0].warm(tx.filter(DAY < D))
    warm_s = time.perf_counter() - t0
    reqs = requests(tx.filter((DAY >= D) & (DAY < D + timedelta(days=9))))
    got_f, got_s = replay(workers, reqs)
    want_f, want_s = batch_of(tiny, reqs)
    diff_f, diff_s = np.abs(got_f - want_f).max(), np.abs(got_s - want_s).max()
    print(f"\nRedis: warm {warm_s:.2f} s; {len(reqs):,} replayed; max abs difference features {diff_f:.1e}, steps {diff_s:.1e}")
    assert diff_f < 1e-9 and diff_s < 1e-9
    late = np.array([r["tx_datetime"].date() >= D + timedelta(days=7) for r in reqs])
    assert (want_f[late, SPEC.names.index("TERMINAL_ID_NB_FRAUD_1DAY_WINDOW")] > 0).any()  # labels that came by feedback


def test_retries_are_counted_once_even_concurrently(redis_url):
    workers = [OnlineFeatures(SPEC, 4, RedisStore(redis_url)) for _ in range(4)]
    first = workers[0].score(req(1, "2018-04-01 10:00:00"))
    results = []
    def retry(w): results.append(w.score(req(2, "2018-04-01 11:00:00", amount=30.0)))
    threads = [threading.Thread(target=retry, args=(w,)) for w in workers for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert len(results) == 16 and all(np.array_equal(f, results[0][0]) and np.array_equal(s, results[0][1]) for f, s in results)
    f3, _ = workers[1].score(req(3, "2018-04-01 12:00:00"))
    assert f3[SPEC.names.index("CUSTOMER_ID_NB_TX_1DAY_WINDOW")] == 3  # 1, 2 (once) and itself
    again = workers[2].score(req(1, "2018-04-01 10:00:00"))  # a retry after later ones: still only what came before
    assert np.array_equal(again[0], first[0]) and np.array_equal(again[1], first[1])
    assert workers[0].store.redis.zcard("mlpay:card:1") == 3
    with pytest.raises(ValueError, match="different contents"): workers[3].score(req(2, "2018-04-01 11:00:00", amount=31.0))


def test_feedback_follows_the_label_delay(redis_url):
    o = OnlineFeatures(SPEC, 0, RedisStore(redis_url))
    o.score(req(1, "2018-04-01 10:00:00", card=1))
    assert o.feedback(1, True) is True
    assert o.feedback(99, True) is False
    def terminal(when, id):
        f = dict(zip(SPEC.names, o.score(req(id, when, card=id))[0]))
        return f["TERMINAL_ID_NB_FRAUD_1DAY_WINDOW"], f["TERMINAL_ID_NB_FRAUD_7DAY_WINDOW"], f["TERMINAL_ID_RISK_1DAY_WINDOW"]
    assert terminal("2018-04-02 10:00:00", 2) == (0, 0, 0)
    assert terminal("2018-04-08 09:59:59", 3) == (0, 0, 0)
    assert terminal("2018-04-08 10:00:00", 4) == (1, 1, 1.0)
    assert terminal("2018-04-09 10:00:00", 5) == (0, 1, 0)
    assert o.feedback(1, False) is True
    assert terminal("2018-04-09 11:00:00", 6) == (0, 0, 0)


def test_eviction_bounds_every_key(redis_url):
    o = OnlineFeatures(SPEC, 2, RedisStore(redis_url), max_lateness_s=3600)
    r = o.store.redis
    for i in range(5): o.score(req(i, f"2018-04-0{i + 1} 10:00:00", card=1, terminal=7))
    o.feedback(0, True)
    assert r.zcard("mlpay:card:1") == 5 and r.zcard("mlpay:term:7") == 5 and r.zcard("mlpay:fraud:7") == 1
    o.score(req(10, "2018-05-20 10:00:00", card=1, terminal=7))  # 45 days later: everything before left every window
    assert r.zcard("mlpay:card:1") == 2  # the new one and the last kept for history
    assert [m.split(b":")[1] for m in r.zrange("mlpay:term:7", 0, -1)] == [b"10"] and r.zcard("mlpay:fraud:7") == 0
    steps = o.score(req(11, "2018-05-20 11:00:00", card=1, terminal=7))[1]
    assert steps[:, 2].tolist() == [1, 1]
    assert 0 < r.ttl("mlpay:term:7") <= 38 * 86400 and 0 < r.ttl("mlpay:tx:0") <= 38 * 86400
    assert r.ttl("mlpay:card:1") == -1  # history kept (card_idle_days=None), as the batch features do
    with pytest.raises(LateTransaction, match="max_lateness_s"): o.score(req(12, "2018-05-20 08:00:00"))
    o2 = OnlineFeatures(SPEC, 0, RedisStore(redis_url, prefix="nohist"))
    o2.score(req(1, "2018-04-01 10:00:00"))
    assert 0 < o2.store.redis.ttl("nohist:card:1") <= 31 * 86400  # without history a card lives only as long as its windows


def test_warm_then_replay_agrees_with_warm(redis_url, tiny):
    tx = tiny[0]
    a = OnlineFeatures(SPEC, 8, RedisStore(redis_url, prefix="a"))
    a.warm(tx.filter(DAY < D))
    replay([a], requests(tx.filter(DAY == D)))
    b = OnlineFeatures(SPEC, 8, RedisStore(redis_url, prefix="b"))
    b.warm(tx.filter(DAY <= D))
    last = requests(tx.filter(DAY == D))[-50:]  # retries of warmed transactions get their batch features
    got_f, got_s = replay([b], last, feedback=False)
    want_f, want_s = batch_of(tiny, last)
    assert np.abs(got_f - want_f).max() < 1e-9 and np.abs(got_s - want_s).max() < 1e-9
    nxt = requests(tx.filter(DAY == D + timedelta(days=1)))
    fa, sa = replay([a], nxt)
    fb, sb = replay([b], nxt)
    assert np.array_equal(fa, fb) and np.array_equal(sa, sb)
    b.warm(tx.filter(DAY <= D))  # warming again changes nothing
    assert np.array_equal(replay([b], nxt[:100], feedback=False)[0], fb[:100])


def test_warm_loads_every_transaction(redis_url, tiny):
    # (how fast warming and scoring are on Redis: bench/online.py)
    tx = tiny[0]
    long = FeatureSpec(card_windows_days=(1, 7, 365), terminal_windows_days=(1, 7, 365))  # keeps all ~100k rows
    o = OnlineFeatures(long, 8, RedisStore(redis_url))
    assert o.store.empty()
    assert o.warm(tx) == len(tx) and not o.store.empty()
    assert o.store.redis.zcard(f"mlpay:card:{tx['CUSTOMER_ID'][0]}") == tx.filter(pl.col("CUSTOMER_ID") == tx["CUSTOMER_ID"][0]).height


def test_bad_input_and_misconfiguration(redis_url):
    o = OnlineFeatures(SPEC, 8, RedisStore(redis_url))
    with pytest.raises(KeyError, match="customer_id"): o.score({k: v for k, v in req(1, "2018-04-01 10:00:00").items() if k != "customer_id"})
    with pytest.raises(ValueError, match="tx_amount"): o.score(req(1, "2018-04-01 10:00:00", amount="ten"))
    with pytest.raises(ValueError, match="another retention"): OnlineFeatures(FeatureSpec(label_delay_days=3), 8, RedisStore(redis_url))
    with pytest.raises(TypeError, match="RDB/AOF"): o.snapshot("/tmp/never-written.npz")
    with pytest.raises(ValueError, match="TX_FRAUD"): o.warm(pl.DataFrame({"TRANSACTION_ID": [1]}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(ConnectionError, match="cannot reach Redis"): RedisStore(f"redis://127.0.0.1:{free}/0")
