"""The offline demos: their synthetic tasks (`tasks`), the stand-in files of `configs/tiny`
(`tiny_run`), the runs themselves (`run`) and their report (`report`)."""
