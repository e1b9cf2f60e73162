"""Rebuilding the whole-ledger answers after a change: the row memo (stats.RowMemo) and the
piecewise gzip (readmodel.PieceGzip) must give exactly what a build from scratch gives, so a
rebuild that renders or compresses only what changed is only faster, never different."""

from __future__ import annotations

import gzip
import random
import shutil
import subprocess
import zlib

import pytest

from slurm_quota import db, metrics, stats
from slurm_quota.readmodel import PIECE_DELIMITERS, PieceGzip
from tests.web.readside import seed_ledger


def _rows(n: int, rnd: random.Random) -> list[tuple]:
    return [
        (f"user{i:04d}", rnd.randrange(10**6), rnd.randrange(10**5), rnd.choice([-1, 10**6]),
         rnd.randrange(10**4), 0, rnd.choice([-1, 0, 10**4]), "2026-12-02 10:00:00",
         rnd.randrange(50))
        for i in range(n)
    ]


def test_rows_json_with_a_memo_is_the_same_text_across_changes():
    rnd = random.Random(7)
    rows = _rows(500, rnd)
    memo = stats.RowMemo()
    assert stats.rows_json("username", rows, memo) == stats.rows_json("username", rows)
    for _ in range(30):  # change, add and remove rows: each build equals a fresh one
        i = rnd.randrange(len(rows))
        choice = rnd.randrange(3)
        if choice == 0:
            row = list(rows[i])
            row[1] += rnd.randrange(1, 1000)
            rows[i] = tuple(row)
        elif choice == 1:
            rows.insert(i, (f"new{rnd.randrange(10**6)}",) + rows[i][1:])
        else:
            del rows[i]
        assert stats.rows_json("username", rows, memo) == stats.rows_json("username", rows)


def test_metrics_with_memos_equal_metrics_without_after_a_change(db_path):
    seed_ledger(db_path)
    conn = db.connect(db_path)
    memos = {"user": stats.RowMemo(), "account": stats.RowMemo()}
    first = metrics.metrics_text(conn, memos=memos)
    assert first == metrics.metrics_text(conn)
    with db.write_transaction(conn):
        conn.execute("UPDATE users SET quota_cpu_minutes = 12345 WHERE username = 'alice'")
    second = metrics.metrics_text(conn, memos=memos)
    assert second == metrics.metrics_text(conn)
    assert second != first and 'username="alice",resource="cpu"} 12345' in second
    conn.close()


def _gunzip_with_the_gzip_command(data: bytes) -> bytes:
    gzip_cmd = shutil.which("gzip")
    if gzip_cmd is None:
        pytest.skip("no gzip command")
    return subprocess.run([gzip_cmd, "-dc"], input=data, capture_output=True, check=True).stdout


@pytest.mark.parametrize("key", sorted(PIECE_DELIMITERS))
def test_piece_gzip_decompresses_to_the_body_across_changes(key):
    rnd = random.Random(11)
    delimiter = PIECE_DELIMITERS[key]
    rows = [
        f'{{"name":"user{i:04d}","used":{rnd.randrange(10**9)},"quota":{rnd.randrange(10**9)}}}'
        .encode()
        for i in range(3000)
    ]
    pieces = PieceGzip(delimiter, piece_bytes=4096)
    for step in range(12):
        body = delimiter.join(rows) + b"\n"
        data = pieces.compress(body)
        assert gzip.decompress(data) == body
        assert _gunzip_with_the_gzip_command(data) == body
        # within a few percent of compressing it whole at the same level
        assert len(data) < len(zlib.compress(body, 5)) * 1.10
        i = rnd.randrange(len(rows))
        rows[i] = rows[i] + b"y" * step  # one row grows: later cuts stay where they were
        if step % 4 == 3:
            del rows[rnd.randrange(len(rows))]


def test_piece_gzip_of_a_body_without_a_delimiter_and_of_nothing():
    pieces = PieceGzip(b"},", piece_bytes=16)
    for body in (b"", b"a", b"x" * 1000, b"},},},", b'{"a":1},{"b":2}' * 50):
        assert gzip.decompress(pieces.compress(body)) == body


def test_piece_gzip_compresses_again_only_the_pieces_that_changed(monkeypatch):
    body = b"\n".join(f"line {i} {'z' * (i % 97)}".encode() for i in range(20000))
    pieces = PieceGzip(b"\n", piece_bytes=8192)
    pieces.compress(body)
    calls = []
    real = zlib.compressobj

    def counting(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(zlib, "compressobj", counting)
    changed = body.replace(b"line 10000 ", b"line 10000 CHANGED ", 1)
    assert gzip.decompress(pieces.compress(changed)) == changed
    assert 1 <= len(calls) <= 2  # of ~130 pieces
