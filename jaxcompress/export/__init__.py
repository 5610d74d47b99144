"""Export: stored-size accounting (packing and files come next)."""
from jaxcompress.export.size import SizeReport as SizeReport
from jaxcompress.export.size import leaf_bits as leaf_bits
from jaxcompress.export.size import size_report as size_report
from jaxcompress.export.shrink import ChannelGroup as ChannelGroup
from jaxcompress.export.shrink import Shrunk as Shrunk
from jaxcompress.export.shrink import channel_groups as channel_groups
from jaxcompress.export.shrink import shrink as shrink
from jaxcompress.export.shrink import tied_channel_masks as tied_channel_masks
