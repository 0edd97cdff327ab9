"""Which units.json `check_units_fit` reads for a folder of unit files."""

import json

import numpy as np
import pytest

from megatron_lst.audio.units_record import check_units_fit


def write_record(folder, num_units=8, frame_rate=25):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "units.json").write_text(json.dumps({"num_units": num_units,
                                                   "frame_rate": frame_rate}))


def write_unit_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.arange(3, dtype=np.int32))


def test_the_record_of_the_extraction_is_found_from_a_subfolder_its_ids_name(tmp_path):
    """LibriSpeech ids (`103/1240/103-1240-0000`) put unit files two folders below the record."""
    units = tmp_path / "units"
    write_record(units)
    write_unit_file(units / "103" / "1240" / "103-1240-0000.npy")
    write_unit_file(units / "19" / "198" / "19-198-0001.npy")
    with pytest.raises(ValueError, match=r"codebook of 8 units \(.*units/units\.json\), more "
                                         r"than --num-units 7 holds"):
        check_units_fit(units / "103" / "1240", 7, 25)


def test_a_record_above_a_folder_no_extraction_wrote_is_ignored(tmp_path):
    """A units.json two folders up, beside files of other kinds (a home folder), describes other
    units: it refused these for its num_units and frame rate."""
    write_record(tmp_path, num_units=1000, frame_rate=50)
    (tmp_path / "notes.md").write_text("not an extraction's output")
    write_unit_file(tmp_path / "units" / "spk0" / "a.npy")
    check_units_fit(tmp_path / "units" / "spk0", 502, 25)


def test_the_record_of_the_folder_itself_is_read_whatever_else_it_holds(tmp_path):
    write_record(tmp_path)
    (tmp_path / "notes.md").write_text("the user's own notes")
    with pytest.raises(ValueError, match="not --frame-rate 50; pass --frame-rate 25"):
        check_units_fit(tmp_path, 8, 50)
