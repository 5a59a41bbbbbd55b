"""Pretrained language models as the text side: loading them (`load`) and giving them eyes by
injecting fusion blocks between their layers (`inject`). The task models built on them are in
`vtfuse.models.pretrained_lm`."""
