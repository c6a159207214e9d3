"""A package, so pytest names these modules news_demo.test_*; tests/examples has no __init__.py on purpose,
since that would make `examples` a test package shadowing the repository's examples/."""
