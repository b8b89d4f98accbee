"""The `forestall` console script (`forestall.cli`): one entry point over the components and the lab.

It is the only package that imports both the product (`controller`, `balancer`, `forecast`) and the lab
(`emulation`), and it does nothing but dispatch subcommands.
"""
