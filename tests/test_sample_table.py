"""The torchvision backend's file table (data_pipeline/torchvision_backend.py, SampleTable): the same (path, label)
pairs as the listing it is built from, in the same order, for any file name; pickled (what each DataLoader worker
receives) as a few buffers rather than one object per file."""

from __future__ import annotations

import pickle

import pytest

from data_pipeline.layout import index_split
from data_pipeline.torchvision_backend import SampleTable


def test_the_pairs_of_the_listing_in_its_order(small_tree):
    samples = index_split(small_tree, "train").samples
    table = SampleTable(samples)
    assert len(table) == len(samples) and [table[i] for i in range(len(table))] == samples
    assert table[-1] == samples[-1]
    with pytest.raises(IndexError):
        table[len(samples)]
    again = pickle.loads(pickle.dumps(table))
    assert [again[i] for i in range(len(again))] == samples


def test_any_file_name_and_a_compact_pickle():
    odd = ["/d/train/n1/é.JPEG", "/d/train/n1/\udcff\udcfe.JPEG", "/d/train/n2/a b.JPEG", "/d/train/n2/x"]
    samples = [(p, i % 2) for i, p in enumerate(odd)]
    assert [SampleTable(samples)[i] for i in range(4)] == samples
    assert len(SampleTable([])) == 0 and SampleTable([("/only.JPEG", 3)])[0] == ("/only.JPEG", 3)
    many = [
        (f"/datasets/imagenet/train/n{c:08d}/n{c:08d}_{j}.JPEG", c) for c in range(100) for j in range(100)
    ]
    blob = pickle.dumps(SampleTable(many))
    assert len(blob) < 0.7 * len(pickle.dumps(many))
    # a few objects, not one a file: what makes unpickling in each worker cheap
    assert blob.count(b"/datasets/imagenet/train/") == 1
