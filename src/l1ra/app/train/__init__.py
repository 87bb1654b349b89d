"""`l1ra train` and `l1ra report`: the command line (command.py) and options (options.py); the recipe that puts the
library's pieces together (recipe.py); the run's examples (examples.py) from a user's file (data.py: formats and
tokenisation) or the shipped sets (shipped_data.py); the models (models.py) and Trainers (trainers.py); the live
records of a run (monitor.py, progress.py, processes.py under torchrun, memory.py) and its plots and summary
(report.py). Light: nothing heavy is imported with the package."""
