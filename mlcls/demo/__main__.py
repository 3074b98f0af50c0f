"""`python -m mlcls.demo`: rebuild the embedded demo bundle and the example images."""

from mlcls.demo.build import main

main()
