"""Where the model looks: attention maps over the image grid and their pictures."""

from vtfuse.visualisation.maps import peak_point, select_layer, to_grid
from vtfuse.visualisation.plot import save_attention_figure

__all__ = ["peak_point", "save_attention_figure", "select_layer", "to_grid"]
