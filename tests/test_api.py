"""The top-level API: `import mlcls` is cheap, and every re-exported name is the library's own object."""

from __future__ import annotations

import subprocess
import sys

import pytest

import mlcls


def test_import_mlcls_does_not_import_torch_or_prefect():
    code = "import sys, mlcls; print('torch' in sys.modules, 'prefect' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_every_export_is_the_defining_modules_object():
    from mlcls.output.reader import OutputTable
    from mlcls.tag.job import TagOptions, tag_images

    assert mlcls.tag_images is tag_images and mlcls.TagOptions is TagOptions and mlcls.OutputTable is OutputTable
    for name in mlcls.__all__:
        assert getattr(mlcls, name) is not None
    assert set(mlcls.__all__) <= set(dir(mlcls))


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'tag_imagez'"):
        _ = mlcls.tag_imagez


def test_tag_images_from_the_top_level(tmp_path, tiny_bundle):
    from tests.helpers.images import write_images

    write_images(tmp_path / "src", 3)
    summary = mlcls.tag_images(str(tmp_path / "src"), str(tmp_path / "out"), tiny_bundle,
                               mlcls.TagOptions(batch_size=2, workers=1))
    assert summary.tagged == 3
    assert mlcls.OutputTable.open(str(tmp_path / "out")).scan().collect().height == 3
