"""Tests of the chapter's experiment (experiments/); the library's tests are one level up."""
