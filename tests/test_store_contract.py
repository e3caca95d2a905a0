"""One contract for every store of the online state: the in-process `MemoryStore`, a real Redis and a real three-node
Redis Cluster (`RedisStore` on either).

Each test runs against all three; a store passes when the online features it serves equal the batch features, retries
count once, labels count only after the label delay, and warming equals replaying. Redis-only behaviour (several
processes on one state, key expiry, connection errors, where a cluster puts the keys) follows at the end.
"""
import itertools
import socket
import threading
import time
from dataclasses import replace
from datetime import date, datetime, timedelta

import numpy as np
import polars as pl
import pytest
import redis

from conftest import ROOT
from mlpay.config import compose
from mlpay.features import compute_features
from mlpay.online import _RECORD, LateTransaction, MemoryStore, OnlineFeatures, RedisStore, StateUnavailable, parse_tx
from mlpay.registry import FeatureRegistry
from mlpay.sequences import history_index, history_steps
from mlpay.simulate import simulate

D = date(2018, 8, 1)
DAY = pl.col("TX_DATETIME").dt.date()
REG = FeatureRegistry.from_cfg(compose(conf_dir=ROOT / "conf"))
RET = dict(max_lateness_s=86_400, card_idle_days=None)  # the server's defaults (ServeSettings)
_prefixes = itertools.count()


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
def stores(request):
    "A factory of stores of one state: Redis (or Redis Cluster) clients that share a key prefix, or one in-process store."
    if request.param == "memory":
        store = MemoryStore()
        yield lambda: store
    else:
        url, prefix = request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url"), f"t{next(_prefixes)}"
        yield lambda: RedisStore(url, prefix=prefix)


@pytest.fixture(params=["redis", "redis-cluster"])
def any_redis_url(request):
    "A single Redis's URL, or a cluster's."
    return request.getfixturevalue("redis_url" if request.param == "redis" else "redis_cluster_url")


@pytest.fixture(scope="module")
def tiny():
    tx = simulate(compose(["data=tiny"], conf_dir=ROOT / "conf").data, progress=False)
    return tx, compute_features(tx, REG), history_steps(tx, history_index(tx, 8), REG)


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
    return feats.select(REG.names).to_numpy()[rows], steps[rows]


def req(id, when, card=1, terminal=7, amount=10.0):
    return dict(transaction_id=id, tx_datetime=datetime.fromisoformat(when), customer_id=card, terminal_id=terminal, tx_amount=amount)


def test_replay_through_two_workers_equals_batch(stores, tiny):
    tx = tiny[0]
    workers = [OnlineFeatures(REG, 8, stores(), **RET) for _ in range(2)]  # two clients of one state
    workers[0].warm(tx.filter(DAY < D))
    reqs = requests(tx.filter((DAY >= D) & (DAY < D + timedelta(days=9))))
    got_f, got_s = replay(workers, reqs)
    want_f, want_s = batch_of(tiny, reqs)
    assert np.abs(got_f - want_f).max() <= 1e-9 and np.abs(got_s - want_s).max() <= 1e-9
    late = np.array([r["tx_datetime"].date() >= D + timedelta(days=7) for r in reqs])
    assert (want_f[late, REG.names.index("TERMINAL_ID_NB_FRAUD_1DAY_WINDOW")] > 0).any()  # labels that came by feedback


def test_features_are_exactly_the_registrys(stores):
    o = OnlineFeatures(REG, 4, stores(), **RET)
    f, s = o.score(req(1, "2018-04-01 10:00:00"))
    assert f.shape == (len(REG.names),) and s.shape == (4, len(REG.steps))
    handbook = FeatureRegistry.from_cfg(compose(["features=handbook"], conf_dir=ROOT / "conf"))
    assert OnlineFeatures(handbook, 0, MemoryStore(), **RET).score(req(1, "2018-04-01 10:00:00"))[0].shape == (15,)


def test_retries_are_counted_once(stores):
    o = OnlineFeatures(REG, 4, stores(), **RET)
    first = o.score(req(1, "2018-04-01 10:00:00"))
    f2 = o.score(req(2, "2018-04-01 11:00:00", amount=30.0))
    assert all(np.array_equal(a, b) for a, b in zip(o.score(req(2, "2018-04-01 11:00:00", amount=30.0)), f2))
    f3, _ = o.score(req(3, "2018-04-01 12:00:00"))
    assert f3[REG.names.index("CUSTOMER_ID_NB_TX_1DAY_WINDOW")] == 3  # 1, 2 (once) and itself
    again = o.score(req(1, "2018-04-01 10:00:00"))  # a retry after later ones: still only what came before it
    assert np.array_equal(again[0], first[0]) and np.array_equal(again[1], first[1])
    with pytest.raises(ValueError, match="different contents"): o.score(req(2, "2018-04-01 11:00:00", amount=31.0))


def test_feedback_follows_the_label_delay(stores):
    o = OnlineFeatures(REG, 0, stores(), **RET)
    o.score(req(1, "2018-04-01 10:00:00", card=1))
    assert o.feedback(1, True) is True
    assert o.feedback(99, True) is False
    def terminal(when, id):
        f = dict(zip(REG.names, o.score(req(id, when, card=id))[0]))
        return f["TERMINAL_ID_NB_FRAUD_1DAY_WINDOW"], f["TERMINAL_ID_NB_FRAUD_7DAY_WINDOW"], f["TERMINAL_ID_RISK_1DAY_WINDOW"]
    assert terminal("2018-04-02 10:00:00", 2) == (0, 0, 0)
    assert terminal("2018-04-08 09:59:59", 3) == (0, 0, 0)   # one second short of the delay
    assert terminal("2018-04-08 10:00:00", 4) == (1, 1, 1.0)  # exactly 7 days: known
    assert terminal("2018-04-09 10:00:00", 5) == (0, 1, 0)
    assert o.feedback(1, False) is True                      # a chargeback reversed
    assert terminal("2018-04-09 11:00:00", 6) == (0, 0, 0)


def test_one_label_delay_everywhere(stores):
    "The delay of conf/ reaches the online state: with 3 days, a label counts after 3 days."
    reg3 = FeatureRegistry.from_cfg(compose(["label_delay_days=3"], conf_dir=ROOT / "conf"))
    o = OnlineFeatures(reg3, 0, stores(), **RET)
    o.score(req(1, "2018-04-01 10:00:00")); o.feedback(1, True)
    f = dict(zip(reg3.names, o.score(req(2, "2018-04-04 10:00:00", card=2))[0]))
    assert f["TERMINAL_ID_NB_FRAUD_1DAY_WINDOW"] == 1 and o.keep.label_delay_us == 3 * 86_400 * 10**6


def test_history_and_lateness(stores):
    o = OnlineFeatures(REG, 2, stores(), max_lateness_s=3600, card_idle_days=None)
    for i in range(5): o.score(req(i, f"2018-04-0{i + 1} 10:00:00", card=1, terminal=7))
    steps = o.score(req(10, "2018-05-20 10:00:00", card=1, terminal=7))[1]  # 45 days later: only the history steps remain
    assert steps[:, -1].tolist() == [1, 1]
    with pytest.raises(LateTransaction, match="max_lateness_s"): o.score(req(12, "2018-05-20 08:00:00"))


def test_warm_then_replay_agrees_with_warm(stores, tiny):
    tx = tiny[0]
    a = OnlineFeatures(REG, 8, stores(), **RET)
    a.warm(tx.filter(DAY < D))
    replay([a], requests(tx.filter(DAY == D)))
    b = OnlineFeatures(REG, 8, MemoryStore(), **RET)  # the reference: warmed with the replayed day too
    b.warm(tx.filter(DAY <= D))
    last = requests(tx.filter(DAY == D))[-50:]  # retries of warmed transactions get their batch features
    got_f, got_s = replay([b], last, feedback=False)
    want_f, want_s = batch_of(tiny, last)
    assert np.abs(got_f - want_f).max() <= 1e-9 and np.abs(got_s - want_s).max() <= 1e-9
    nxt = requests(tx.filter(DAY == D + timedelta(days=1)))
    fa, sa = replay([a], nxt)
    fb, sb = replay([b], nxt)
    assert np.array_equal(fa, fb) and np.array_equal(sa, sb)


def test_bad_input(stores):
    o = OnlineFeatures(REG, 8, stores(), **RET)
    with pytest.raises(KeyError, match="customer_id"): o.score({k: v for k, v in req(1, "2018-04-01 10:00:00").items() if k != "customer_id"})
    with pytest.raises(ValueError, match="tx_amount"): o.score(req(1, "2018-04-01 10:00:00", amount="ten"))
    with pytest.raises(ValueError, match="TX_FRAUD"): o.warm(pl.DataFrame({"TRANSACTION_ID": [1]}))
    with pytest.raises(ValueError, match="another retention"): OnlineFeatures(replace(REG, label_delay_days=3), 8, o.store, **RET)


# -- Redis only: several processes on one state, expiry by TTL, a server that is not there


def test_concurrent_retries_on_redis_are_counted_once(any_redis_url):
    workers = [OnlineFeatures(REG, 4, RedisStore(any_redis_url), **RET) for _ in range(4)]
    workers[0].score(req(1, "2018-04-01 10:00:00"))
    results = []
    def retry(w): results.append(w.score(req(2, "2018-04-01 11:00:00", amount=30.0)))
    threads = [threading.Thread(target=retry, args=(w,)) for w in workers for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert len(results) == 16 and all(np.array_equal(f, results[0][0]) and np.array_equal(s, results[0][1]) for f, s in results)
    assert workers[0].store.redis.zcard("mlpay:card:1") == 2


def test_redis_keys_are_bounded(any_redis_url):
    o = OnlineFeatures(REG, 2, RedisStore(any_redis_url), max_lateness_s=3600, card_idle_days=None)
    r = o.store.redis
    for i in range(5): o.score(req(i, f"2018-04-0{i + 1} 10:00:00", card=1, terminal=7))
    o.feedback(0, True)
    assert r.zcard("mlpay:card:1") == 5 and r.zcard("mlpay:term:{7}") == 5 and r.zcard("mlpay:fraud:{7}") == 1
    o.score(req(10, "2018-05-20 10:00:00", card=1, terminal=7))
    assert r.zcard("mlpay:card:1") == 2  # the new one and the last kept for history
    assert [int.from_bytes(m[8:16], "big") - 2**63 for m in r.zrange("mlpay:term:{7}", 0, -1)] == [10] and r.zcard("mlpay:fraud:{7}") == 0  # (t, id + 2**63)
    assert 0 < r.ttl("mlpay:term:{7}") <= 38 * 86400 and 0 < r.ttl("mlpay:tx:0") <= 38 * 86400
    assert r.ttl("mlpay:card:1") == -1  # history kept (card_idle_days=None), as the batch features do
    o2 = OnlineFeatures(REG, 0, RedisStore(any_redis_url, prefix="nohist"), **RET)
    o2.score(req(1, "2018-04-01 10:00:00"))
    assert 0 < o2.store.redis.ttl("nohist:card:1") <= 31 * 86400  # without history a card lives only as long as its windows


def test_warm_loads_every_transaction_into_redis(any_redis_url, tiny):
    # (how fast warming and scoring are on Redis: bench/online.py)
    tx = tiny[0]
    year = replace(REG, features=tuple(replace(f, window_days=365) if f.window_days == 30 else f for f in REG.features))
    o = OnlineFeatures(year, 8, RedisStore(any_redis_url), **RET)  # a year of windows keeps all ~100k rows
    assert o.store.empty()
    assert o.warm(tx) == len(tx) and not o.store.empty()
    assert o.store.redis.zcard(f"mlpay:card:{tx['CUSTOMER_ID'][0]}") == tx.filter(pl.col("CUSTOMER_ID") == tx["CUSTOMER_ID"][0]).height


def test_redis_misconfiguration(redis_url):
    o = OnlineFeatures(REG, 8, RedisStore(redis_url), **RET)
    with pytest.raises(TypeError, match="RDB/AOF"): o.snapshot("/tmp/never-written.npz")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(ConnectionError, match="cannot reach Redis"): RedisStore(f"redis://127.0.0.1:{free}/0")


def test_record_all_is_record_in_order(stores):
    "What a backlog or a journal writes back: each transaction recorded in order; late and changed ones counted, not raised."
    a, b = OnlineFeatures(REG, 8, stores(), **RET), OnlineFeatures(REG, 8, MemoryStore(), **RET)
    xs = [parse_tx(req(i, f"2018-04-01 1{i}:00:00", card=i % 2)) for i in range(6)]
    for x in xs: b.store.record(x)
    changed = parse_tx(req(0, "2018-04-01 10:00:00", amount=99.0))
    late = parse_tx(req(50, "2018-03-01 10:00:00"))
    assert a.store.record_all(xs + [xs[0], changed, late]) == 2  # a plain retry is fine
    probe = req(60, "2018-04-01 18:00:00", card=1)
    assert np.array_equal(a.score(probe)[0], b.score(probe)[0])


def test_record_many_is_record_in_order(stores):
    "What a server's turn sends, in one round trip: each transaction sees the ones before it, features and history as `record` gives; refused ones (late, changed) come back in their place and stop nothing."
    a, b = OnlineFeatures(REG, 8, stores(), **RET), OnlineFeatures(REG, 8, MemoryStore(), **RET)
    xs = [parse_tx(req(i, f"2018-04-01 10:0{i}:00", card=i % 2, terminal=7 + i % 3)) for i in range(8)]
    xs[3:3] = [xs[1], parse_tx(req(0, "2018-04-01 10:00:00", amount=99.0)), parse_tx(req(50, "2018-03-01 10:00:00"))]  # a retry, changed, late
    got = a.record_many(xs)
    assert [type(g).__name__ for g in got] == ["tuple"] * 4 + ["ValueError", "LateTransaction"] + ["tuple"] * 5
    for x, g in zip(xs, got):
        if isinstance(g, Exception):
            with pytest.raises(type(g), match="different contents|max_lateness_s"): b.record(x)
        else:
            agg, history = b.record(x)
            assert np.array_equal(a.features([g[0]]), b.features([agg])) and np.array_equal(a.steps([g[1]]), b.steps([history]))
    assert a.record_many([]) == []


def test_a_redis_that_fails_is_state_unavailable(redis_process):
    "Down, paused (slow) or answering nonsense: StateUnavailable within the timeout, never a wrong feature; and back when Redis is."
    o = OnlineFeatures(REG, 8, RedisStore(redis_process.url, timeout_s=0.05), **RET)
    o.score(req(1, "2018-04-01 10:00:00"))
    redis_process.pause()
    t0 = time.perf_counter()
    with pytest.raises(StateUnavailable, match="TimeoutError"): o.score(req(2, "2018-04-01 10:01:00"))
    assert time.perf_counter() - t0 < 1.0 and not o.store.ping()
    redis_process.resume()
    assert o.store.ping()
    redis_process.stop()
    for call in (lambda: o.score(req(3, "2018-04-01 10:02:00")), lambda: o.feedback(1, True),
                 lambda: o.store.record_all([parse_tx(req(4, "2018-04-01 10:03:00"))])):
        with pytest.raises(StateUnavailable, match="Redis unavailable"): call()
    redis_process.start()  # the saved data set is back: the first transaction is known
    with pytest.raises(ValueError, match="different contents"): o.score(req(1, "2018-04-01 10:00:00", amount=1.0))
    o.store._eval = lambda client, calls: [[b"", b"not,numbers", b"", b""]] * len(calls)  # an answer that does not parse
    with pytest.raises(StateUnavailable, match="does not parse"): o.score(req(5, "2018-04-01 10:04:00"))


# -- Redis Cluster only: where a transaction's keys go, and a node that stops answering


def test_a_cluster_runs_each_step_on_one_slot(redis_cluster, redis_cluster_url):
    "One transaction's keys lie on several nodes, each step's on one; the single-Redis script would be refused there (CROSSSLOT)."
    store = RedisStore(redis_cluster_url)
    o = OnlineFeatures(REG, 4, store, **RET)
    assert store.cluster
    o.score(req(1, "2018-04-01 10:00:00", card=1, terminal=7))
    assert o.feedback(1, True)
    _, steps = store._steps(parse_tx(req(1, "2018-04-01 10:00:00", card=1, terminal=7)), True)
    keys = [k for step_keys, _ in steps for k in step_keys]
    assert keys == ["mlpay:watermark", "mlpay:tx:0", "mlpay:card:1", "mlpay:term:{7}", "mlpay:fraud:{7}"]
    port = {k: redis_cluster.port_of(k) for k in keys}
    assert all(redis.Redis(port=port[k]).exists(k) for k in keys)  # each key on the master that serves its slot
    assert port["mlpay:term:{7}"] == port["mlpay:fraud:{7}"] and len(set(port.values())) == 3  # this one needs every node
    with pytest.raises(redis.ResponseError, match="hash to the same slot"):  # CROSSSLOT
        redis.Redis(port=port[keys[0]]).eval(_RECORD, len(keys), *keys, *(a for _, step_args in steps for a in step_args))


def test_a_paused_cluster_node_is_state_unavailable_for_its_keys(redis_cluster, redis_cluster_url):
    "One master paused: a transaction whose keys it serves is StateUnavailable, never a wrong feature; others score on; once it is back the retry completes the record, counted once."
    store = RedisStore(redis_cluster_url, timeout_s=0.5)  # long enough for a loaded machine, far below the node timeout (15 s)
    o, ref = OnlineFeatures(REG, 8, store, **RET), OnlineFeatures(REG, 8, MemoryStore(), **RET)
    node = lambda kind, k: redis_cluster.port_of(store._key(kind, k))
    paused = next(p for p in redis_cluster.ports if p not in {redis_cluster.port_of(store._wm), node("tx", 0)})
    terminal = next(t for t in range(100) if node("term", t) != paused)
    on, off = (next(c for c in range(100) if (node("card", c) == paused) == want) for want in (True, False))
    def same(r):
        (f, s), (g, t) = o.score(r), ref.score(r)
        return np.array_equal(f, g) and np.array_equal(s, t)
    assert same(req(1, "2018-04-01 10:00:00", card=on, terminal=terminal)) and same(req(2, "2018-04-01 10:01:00", card=off, terminal=terminal))
    redis_cluster.pause(paused)
    try:
        with pytest.raises(StateUnavailable, match="TimeoutError"): o.score(req(3, "2018-04-01 10:02:00", card=on, terminal=terminal))
        assert not store.ping()
        assert same(req(4, "2018-04-01 10:03:00", card=off, terminal=terminal))  # its keys are on the other nodes
    finally:
        redis_cluster.resume(paused)
    assert store.ping()
    assert same(req(3, "2018-04-01 10:02:00", card=on, terminal=terminal))  # the retry (as the server's backlog sends it)
    assert same(req(5, "2018-04-01 10:04:00", card=on, terminal=terminal))
    assert store.redis.zcard(store._key("card", on)) == 3
