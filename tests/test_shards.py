"""common.parallel's --shard K/N: which batches a shard takes, where its part goes, what --merge finds."""

import pytest

from common import parallel
from common.errors import InputError


@pytest.mark.parametrize("total, batch_size, count", [(7, 2, 3), (10, 3, 4), (5, 5, 1), (64, 8, 8)])
def test_shards_deal_whole_batches_that_together_are_the_run(total, batch_size, count):
    one_run = [range(start, min(start + batch_size, total)) for start in range(0, total, batch_size)]
    dealt = [parallel.shard_batches(total, batch_size, (index, count)) for index in range(1, count + 1)]
    assert sorted((batch for batches in dealt for batch in batches), key=lambda b: b.start) == one_run
    for index, batches in enumerate(dealt, start=1):
        assert batches == one_run[index - 1 :: count]  # every N-th batch from the K-th
        assert parallel.shard_rows(total, batch_size, (index, count)) == [row for b in batches for row in b]


@pytest.mark.parametrize("text", ["0/3", "4/3", "x", "1/0", "1/2/3", "-1/3", "1.5/3"])
def test_bad_shard_values_are_one_error(text):
    with pytest.raises(InputError, match=r"--shard: got .*; expected K/N with 1 <= K <= N"):
        parallel.parse_shard(text)


def test_shard_values_and_a_shard_without_work():
    assert parallel.parse_shard("") is None and parallel.parse_shard("3/8") == (3, 8)
    with pytest.raises(
        InputError, match=r"leaves shard 5 no work \(7 items, 4 batches of 2\); expected at most 4"
    ):
        parallel.shard_batches(7, 2, (5, 5))


def test_merge_finds_every_part_or_names_the_missing_one(tmp_path):
    out = tmp_path / "captions.csv"
    assert parallel.shard_path(out, (2, 3), ".csv") == tmp_path / "captions.csv.shards" / "2_of_3.csv"
    with pytest.raises(InputError, match=r"captions\.csv\.shards: holds no shard parts"):
        parallel.shard_parts(out, ".csv")
    for index in (1, 3):
        path = parallel.shard_path(out, (index, 3), ".csv")
        path.parent.mkdir(exist_ok=True)
        path.write_text("")
    with pytest.raises(InputError, match=r"2_of_3\.csv: is missing or unfinished; expected all 3 shards"):
        parallel.shard_parts(out, ".csv")
    parallel.shard_path(out, (2, 3), ".csv").write_text("")
    assert parallel.shard_parts(out, ".csv") == [parallel.shard_path(out, (k, 3), ".csv") for k in (1, 2, 3)]
    with pytest.raises(InputError, match=r"1_of_3\.csv: is missing or unfinished"):
        parallel.shard_parts(out, ".csv", finished=lambda part: part.stat().st_size > 0)
    parallel.shard_path(out, (1, 2), ".csv").write_text("")
    with pytest.raises(InputError, match=r"holds parts of several shard counts \[2, 3\]"):
        parallel.shard_parts(out, ".csv")
