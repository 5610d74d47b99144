"""End-to-end recipes built from the library's public pieces."""
from jaxcompress.recipes.demo import DemoConfig as DemoConfig
from jaxcompress.recipes.demo import run_demo as run_demo
from jaxcompress.recipes.report import report_markdown as report_markdown
from jaxcompress.recipes.report import write_report as write_report
