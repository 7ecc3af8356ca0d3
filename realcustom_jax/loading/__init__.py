"""Where models come from: checkpoint readers and loaders (`weights`), the config's choice
of models (`components`), the tiny random models built in code (`tiny`), input images."""
