"""One module per pipeline stage; the table that orders them is `puzzle.pipeline.STAGES`."""
