"""Models as esm-ray uses them: Hugging Face loading, tokenizing and pooling of sentence encoders
(`encoder`), task heads (`heads`), pooled backbone features (`features`). Used by stats, the
runtime's search, routed, eval and the zoo alike; knows nothing of Ray, HTTP or S3."""
