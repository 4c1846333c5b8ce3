"""Reading and writing files and formats: images and paths, DICOM series, DICOM-SEG and SR, 3D Slicer segmentations, pseudonyms."""
