"""spinemets.figures: the colour maps and the display window that every figure and notebook shares."""

import numpy as np

from spinemets import figures, labels


def test_label_colormap_uses_the_label_table_with_a_transparent_background():
    cmap = figures.label_colormap("metastases", 0.9)
    assert cmap.N == 3
    assert tuple(cmap(0)) == (0.0, 0.0, 0.0, 0.0)
    assert np.allclose(cmap(1)[:3], labels.LESION_COLOURS["lytic"]) and cmap(1)[3] == 0.9
    assert np.allclose(cmap(2)[:3], labels.LESION_COLOURS["sclerotic"])
    vert = figures.label_colormap("vertebrae")
    assert vert.N == 26 and np.allclose(vert(labels.STAGES["vertebrae"]["labels"]["L1"])[:3],
                                        labels.colour("vertebrae", "L1"))


def test_one_ct_window():
    assert figures.CT_WINDOW == {"cmap": "gray", "vmin": -250, "vmax": 1250}
