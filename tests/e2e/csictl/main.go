// csictl plays kubelet's part of the CSI protocol for tests/e2e/run.sh.
//
// The end-to-end test has a real API server, controllers and sidecars but no kubelet, so
// the node-side calls kubelet would make (NodeGetInfo at registration, NodeStage,
// NodePublish, NodeExpand, NodeUnpublish, NodeUnstage) are made by this small client on
// the driver's node socket. It also lists the controller capabilities, so the test can
// tell which optional steps the driver supports. Every call has a deadline.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

const usage = `usage: csictl -endpoint unix:///PATH.sock [-timeout 2m] COMMAND [FLAGS]

commands:
  controller-caps   one advertised controller capability per line (CREATE_DELETE_SNAPSHOT, ...)
  node-caps         one advertised node capability per line
  node-info         NodeGetInfo: lines "node_id ID", "max_volumes N", "topology KEY VALUE"
  stage             NodeStageVolume    -volume-id -staging [volume flags]
  publish           NodePublishVolume  -volume-id [-staging] -target [-readonly] [volume flags]
  unpublish         NodeUnpublishVolume -volume-id -target
  unstage           NodeUnstageVolume  -volume-id -staging
  expand            NodeExpandVolume   -volume-id -target -staging -bytes N [volume flags]:
                    line "capacity_bytes N"
  stats             NodeGetVolumeStats -volume-id -target: lines "bytes_total N", "bytes_used N"

volume flags describe the capability as kubelet derives it from the PersistentVolume:
  -block                 raw block instead of a filesystem
  -fstype TYPE           filesystem type (PV spec.csi.fsType)
  -access-mode MODE      a CSI access mode name (default SINGLE_NODE_WRITER)
  -publish-context JSON  VolumeAttachment status.attachmentMetadata
  -volume-context JSON   PV spec.csi.volumeAttributes
`

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintf(os.Stderr, "csictl: %v\n", err)
		os.Exit(1)
	}
}

// volumeFlags are the flags every call that carries a volume capability accepts.
type volumeFlags struct {
	volumeID, staging, target string
	block, readonly           bool
	fsType, accessMode        string
	publishCtx, volumeCtx     string
	bytes                     int64
}

func (v *volumeFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&v.volumeID, "volume-id", "", "CSI volume id (PV spec.csi.volumeHandle)")
	fs.StringVar(&v.staging, "staging", "", "staging target path")
	fs.StringVar(&v.target, "target", "", "publish target path")
	fs.BoolVar(&v.block, "block", false, "raw block access type")
	fs.BoolVar(&v.readonly, "readonly", false, "publish read-only")
	fs.StringVar(&v.fsType, "fstype", "", "filesystem type")
	fs.StringVar(&v.accessMode, "access-mode", "SINGLE_NODE_WRITER", "CSI access mode")
	fs.StringVar(&v.publishCtx, "publish-context", "", "publish context as a JSON object")
	fs.StringVar(&v.volumeCtx, "volume-context", "", "volume context as a JSON object")
	fs.Int64Var(&v.bytes, "bytes", 0, "required bytes (expand)")
}

func (v *volumeFlags) capability() (*csi.VolumeCapability, error) {
	mode, ok := csi.VolumeCapability_AccessMode_Mode_value[v.accessMode]
	if !ok {
		return nil, fmt.Errorf("unknown access mode %q", v.accessMode)
	}
	c := &csi.VolumeCapability{
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: csi.VolumeCapability_AccessMode_Mode(mode)},
	}
	if v.block {
		c.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
	} else {
		c.AccessType = &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{FsType: v.fsType}}
	}
	return c, nil
}

// jsonMap decodes a JSON object of strings; kubectl prints an absent map as an empty string.
func jsonMap(name, s string) (map[string]string, error) {
	m := map[string]string{}
	if strings.TrimSpace(s) == "" {
		return m, nil
	}
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		return nil, fmt.Errorf("-%s: %w", name, err)
	}
	return m, nil
}

func need(pairs ...string) error {
	for i := 0; i+1 < len(pairs); i += 2 {
		if pairs[i+1] == "" {
			return fmt.Errorf("-%s is required", pairs[i])
		}
	}
	return nil
}

func run(args []string) error {
	global := flag.NewFlagSet("csictl", flag.ContinueOnError)
	global.Usage = func() { fmt.Fprint(os.Stderr, usage) }
	endpoint := global.String("endpoint", "", "CSI endpoint, unix:///ABS/PATH.sock")
	timeout := global.Duration("timeout", 2*time.Minute, "deadline of the call")
	if err := global.Parse(args); err != nil {
		return err
	}
	if *endpoint == "" || global.NArg() == 0 {
		global.Usage()
		return errors.New("an -endpoint and a command are required")
	}
	cmd, rest := global.Arg(0), global.Args()[1:]

	var v volumeFlags
	fs := flag.NewFlagSet(cmd, flag.ContinueOnError)
	v.register(fs)
	if err := fs.Parse(rest); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return fmt.Errorf("unexpected arguments: %v", fs.Args())
	}

	// grpc-go dials unix:///path targets itself; the socket is local, so no TLS.
	conn, err := grpc.NewClient(*endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("connect %s: %w", *endpoint, err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	node := csi.NewNodeClient(conn)

	switch cmd {
	case "controller-caps":
		r, err := csi.NewControllerClient(conn).ControllerGetCapabilities(ctx, &csi.ControllerGetCapabilitiesRequest{})
		if err != nil {
			return err
		}
		var names []string
		for _, c := range r.GetCapabilities() {
			names = append(names, c.GetRpc().GetType().String())
		}
		return printLines(names)
	case "node-caps":
		r, err := node.NodeGetCapabilities(ctx, &csi.NodeGetCapabilitiesRequest{})
		if err != nil {
			return err
		}
		var names []string
		for _, c := range r.GetCapabilities() {
			names = append(names, c.GetRpc().GetType().String())
		}
		return printLines(names)
	case "node-info":
		r, err := node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
		if err != nil {
			return err
		}
		lines := []string{"node_id " + r.GetNodeId(), fmt.Sprintf("max_volumes %d", r.GetMaxVolumesPerNode())}
		for k, v := range r.GetAccessibleTopology().GetSegments() {
			lines = append(lines, "topology "+k+" "+v)
		}
		return printLines(lines)
	case "stage", "publish", "expand":
		capability, err := v.capability()
		if err != nil {
			return err
		}
		pubCtx, err := jsonMap("publish-context", v.publishCtx)
		if err != nil {
			return err
		}
		volCtx, err := jsonMap("volume-context", v.volumeCtx)
		if err != nil {
			return err
		}
		switch cmd {
		case "stage":
			if err := need("volume-id", v.volumeID, "staging", v.staging); err != nil {
				return err
			}
			_, err = node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{
				VolumeId: v.volumeID, StagingTargetPath: v.staging, VolumeCapability: capability,
				PublishContext: pubCtx, VolumeContext: volCtx,
			})
		case "publish":
			// No -staging for a driver without STAGE_UNSTAGE_VOLUME, as with kubelet.
			if err := need("volume-id", v.volumeID, "target", v.target); err != nil {
				return err
			}
			_, err = node.NodePublishVolume(ctx, &csi.NodePublishVolumeRequest{
				VolumeId: v.volumeID, StagingTargetPath: v.staging, TargetPath: v.target,
				VolumeCapability: capability, Readonly: v.readonly,
				PublishContext: pubCtx, VolumeContext: volCtx,
			})
		case "expand":
			if err := need("volume-id", v.volumeID, "target", v.target); err != nil {
				return err
			}
			if v.bytes <= 0 {
				return errors.New("-bytes must be positive")
			}
			var r *csi.NodeExpandVolumeResponse
			r, err = node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{
				VolumeId: v.volumeID, VolumePath: v.target, StagingTargetPath: v.staging,
				CapacityRange: &csi.CapacityRange{RequiredBytes: v.bytes}, VolumeCapability: capability,
			})
			if err == nil {
				fmt.Printf("capacity_bytes %d\n", r.GetCapacityBytes())
			}
		}
		return err
	case "unpublish":
		if err := need("volume-id", v.volumeID, "target", v.target); err != nil {
			return err
		}
		_, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: v.volumeID, TargetPath: v.target})
		return err
	case "unstage":
		if err := need("volume-id", v.volumeID, "staging", v.staging); err != nil {
			return err
		}
		_, err := node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{VolumeId: v.volumeID, StagingTargetPath: v.staging})
		return err
	case "stats":
		if err := need("volume-id", v.volumeID, "target", v.target); err != nil {
			return err
		}
		r, err := node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{
			VolumeId: v.volumeID, VolumePath: v.target, StagingTargetPath: v.staging,
		})
		if err != nil {
			return err
		}
		for _, u := range r.GetUsage() {
			if u.GetUnit() == csi.VolumeUsage_BYTES {
				fmt.Printf("bytes_total %d\nbytes_used %d\n", u.GetTotal(), u.GetUsed())
			}
		}
		return nil
	default:
		global.Usage()
		return fmt.Errorf("unknown command %q", cmd)
	}
}

func printLines(lines []string) error {
	sort.Strings(lines)
	for _, l := range lines {
		fmt.Println(l)
	}
	return nil
}
