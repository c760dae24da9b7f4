"""Preview montages (data_pipeline/montage.py): what each tile shows, pixel for pixel."""

import numpy as np
import pytest
from PIL import Image

from data_pipeline.montage import HEART_RGB, Tile, render_tile, write_montage

WINDOW = (-200.0, 600.0)
RED = (1.0, 0.0, 0.0, 1.0)


def test_a_small_slice_is_enlarged_by_whole_pixels_with_its_overlays():
    hu = np.full((64, 64), -200.0)
    hu[:, 32:] = 600.0
    labels = np.zeros((64, 64), int)
    labels[10, 10] = 1  # one voxel of calcium
    labels[20, 20] = 2  # a value without a colour: not drawn
    heart = np.zeros((64, 64), bool)
    heart[30:40, 30:40] = True
    rgb = render_tile(Tile(hu, labels, heart), WINDOW, {1: RED}, side=256)
    assert rgb.shape == (256, 256, 3)  # 4 x 4 pixels per voxel
    np.testing.assert_allclose(rgb[0, 0], 0.0)  # the window's lower end is black
    np.testing.assert_allclose(rgb[0, 255], 1.0)  # its upper end white
    np.testing.assert_allclose(rgb[40:44, 40:44], np.broadcast_to(RED[:3], (4, 4, 3)))
    np.testing.assert_allclose(rgb[80:84, 80:84], 0.0)
    outline = np.all(rgb == HEART_RGB, axis=-1)
    assert outline[120, 130] and outline[130, 120] and not outline[140, 140]  # edge, not inside
    assert outline.sum() == 4 * 40 - 4


def test_a_large_slice_is_reduced_by_blocks_and_keeps_a_one_voxel_lesion():
    hu = np.zeros((512, 512))
    hu[::2] = 400.0  # stripes average to 200 HU in every 2 x 2 block
    labels = np.zeros((512, 512), int)
    labels[301, 77] = 1
    rgb = render_tile(Tile(hu, labels), WINDOW, {1: (0.0, 0.0, 1.0, 0.5)}, side=256)
    assert rgb.shape == (256, 256, 3)
    grey = (200.0 - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    np.testing.assert_allclose(rgb[0, 0], grey, rtol=1e-6)
    np.testing.assert_allclose(rgb[150, 38], [grey / 2, grey / 2, grey / 2 + 0.5], rtol=1e-6)


def test_the_montage_is_one_png_with_every_tile(tmp_path):
    # Tiles drawn all green (an overlay everywhere), so their pixels are told from text and gaps.
    tiles = [Tile(np.zeros((32, 48)), np.ones((32, 48), int), caption=f"slice {k}")
             for k in range(5)]
    path = tmp_path / "p.png"
    write_montage(path, tiles, title="title\nsecond line", window=WINDOW,
                  colours={1: (0.0, 1.0, 0.0, 1.0)}, cols=4)
    image = np.asarray(Image.open(path).convert("RGB")).astype(int)
    green = (image == [0, 255, 0]).all(axis=-1)
    # 48 px -> 5 pixels per voxel: 5 tiles of 160 x 240, placed pixel for pixel.
    assert green.sum() == 5 * 160 * 240
    rows, cols = np.flatnonzero(green.any(axis=1)), np.flatnonzero(green.any(axis=0))
    assert rows[-1] - rows[0] + 1 > 2 * 160 and cols[-1] - cols[0] + 1 > 4 * 240  # 4 + 1 tiles
    assert not green[:rows[0]].any() and rows[0] > 30  # the title and a caption above
    assert list(tmp_path.iterdir()) == [path]  # written atomically: nothing else left
    with pytest.raises(ValueError, match="at least one tile"):
        write_montage(tmp_path / "q.png", [], title="", window=WINDOW, colours={})
