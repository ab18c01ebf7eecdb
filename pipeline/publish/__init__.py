"""What a user runs after a run: browse, the gallery, export (hf, llava, sharegpt, webdataset), the dataset
card and the report page, all reading a root's committed units through `source.CommittedSource`."""
