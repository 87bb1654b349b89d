"""`l1ra train` and `l1ra report`: the options (options.py), the command line (command.py), the recipe that puts the
library's pieces together (recipe.py), the data (data.py) and models (models.py) it loads, the Trainers
(trainers.py), the live records of a run (monitor.py, progress.py, processes.py under torchrun) and its plots and
summary (report.py). Light: nothing heavy is imported with the package."""
