"""A document refused by `AlignedDocument.validate` or `check_stored_document` carries the sort
of problem (`DocumentError.kind`) that `--skip-bad` tallies its skips by (`ReadReport.skip`)."""

import pickle

import numpy as np
import pytest

from megatron_lst.data.documents import AlignedDocument, DocumentError, check_stored_document
from megatron_lst.data.read_report import ReadReport

TEXT_SIZE, NUM_UNITS, BOS_EOS = 50, 10, (1, 2)


def aligned(text_ids, unit_ids, seg_text_len, seg_unit_len) -> AlignedDocument:
    return AlignedDocument(*(np.asarray(values, dtype=np.int32) for values in
                             (text_ids, unit_ids, seg_text_len, seg_unit_len)))


@pytest.mark.parametrize("stored, kind", [
    (aligned([], [], [], []), "empty document"),
    (aligned([5], [3], [2], [1]), "inconsistent segment table"),
    (aligned([5], [3, 4], [1, 0], [1, 0]), "inconsistent segment table"),
    (aligned([5], [3], [1, 0], [1, 0]), "silence without units"),
    (aligned([5], [30], [1], [1]), "unit outside the codebook"),
    (aligned([70], [3], [1], [1]), "text id outside the tokenizer"),
    (aligned([5, 2], [3], [2], [1]), "BOS or EOS in text"),
    (np.asarray([5, 70], dtype=np.int32), "text id outside the tokenizer"),
])
def test_a_stored_document_refused_is_tallied_by_its_kind(stored, kind):
    with pytest.raises(DocumentError) as refused:
        check_stored_document(stored, TEXT_SIZE, NUM_UNITS, "data.bin, document 3", BOS_EOS)
    assert refused.value.kind == kind
    assert pickle.loads(pickle.dumps(refused.value)).kind == kind  # from a worker process
    report = ReadReport()
    report.skip("data.bin, document 3", refused.value)
    assert [(skip.where, skip.kind) for skip in report.skipped] == [("data.bin, document 3", kind)]
