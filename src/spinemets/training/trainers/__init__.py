"""nnU-Net trainers of the project.

nnU-Net finds these classes by name through the ``nnUNet_extTrainer`` environment variable,
which :meth:`spinemets.paths.Workspace.environment` points at this folder. nnU-Net imports
each module of the folder as a top-level module, so the modules here use absolute imports only.
"""
