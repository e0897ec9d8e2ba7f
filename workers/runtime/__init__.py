"""The loops: batch (files), stream (Kafka), serve (HTTP). Each imports the scorer, sources and sinks."""
